// QkvAttention's kernel, shared by the library (qkv_attention.cu) and the micro-benchmark
// (benchmarks/device/kernel_bench/qkv_attention_bench.cu), so that what the bench times is what ships.
// The DiT's self-attention straight from its q|k|v GEMM output:
//   q_h, k_h = rope(LayerNorm(x_h) * gamma_h + beta_h) for the q and k heads of x = qkv[r, l, :]
//   (one rounding to fp16, as HeadNormRopeQkv writes them), v_h as it is;
//   out[r, l, h*64 + d] = softmax_j(q_h[l] . k_h[j] / 8) . v_h[:, d] over the L keys j of row r.
// qkv [R, L, 3*H*64] fp16 (q heads, then k heads, then v heads); gamma/beta [2H, 64] (the q heads'
// rows, then the k heads') or [64] (shared); cos/sin [>= L, 32]: the half-split rotation
//   y'[j] = y[j] cos[l, j] - y[j + 32] sin[l, j],  y'[j + 32] = y[j + 32] cos[l, j] + y[j] sin[l, j].
// out [R, L, H*64].
//
// One block per (query tile, head, row); a warp runs 16 queries (one m16 tile of mma.sync.m16n8k16).
// Keys in tiles of 64 in shared memory (cp.async), in one of three ways:
// - resident (kStages = kQkvResidentTiles, where L fits: the DiT's 250 frames): every tile is loaded
//   at once, all K rows are normed and rotated in place by the block, and after ONE barrier each
//   warp runs its queries over all tiles with no further barrier or global load;
// - split keys (resident, 8 warps for 64 queries): warp w runs query group w % 4 over key half w / 4
//   (the first ceil(tiles / 2) tiles, or the rest: none when L <= 64). The 8 warps share the K and Q
//   norms (half the rows per warp), so each query's serial chain of MMAs and softmax steps, and the
//   norms before it, are half as long, with twice the warps per SM to hide each other's latency.
//   Then warp w + 4 hands its unnormalised O, running maxima and partial sums to warp w through
//   shared memory (a barrier per pair of warps), which rescales both to the larger maximum (fp32),
//   adds them and stores as below;
// - a ring of two buffers (kStages = 2, any L): per tile, wait for its copies, norm its K rows,
//   barrier, attend, barrier, refill the buffer with the tile after next.
// The K norms cost one pass over K per query tile instead of a separate kernel writing q, k and v.
// Resident and ring compute the same to the bit; split keys do not (P is rounded relative to each
// half's running maximum), within the same error of the exact attention. The softmax is online
// (running max and sum per query row, in fp32, exp2 with the scale folded in); P is rounded to fp16
// once, in the register layout of PV's A operand. Keys past L are zeros in shared memory and -inf in
// the logits. The output is divided by the row sum in fp32, rounded once, staged through the warp's
// Q rows and written in 16-byte vectors.
// Where the grid is small, 4 warps (64 queries a block), resident where L allows, else in the ring;
// split keys instead where their blocks all run at once, one per SM (batch 1: 128 blocks for 132
// SMs; $SEMVOC_QKV_SPLIT_KEYS=0 says no, for A/B measurements); 8 warps (128 queries: half the K
// norms and K/V loads per query) in the ring where it fills the GPU twice over anyway (the ring's
// smaller blocks keep several resident per SM).
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include "mma_sync.cuh"
#include "ort_op.h"

namespace semvoc {

constexpr int kQkvHd = 64;
constexpr int kQkvStride = kQkvHd + 8;  // halves per shared row (ldmatrix's 8 rows hit 8 bank groups)
constexpr int kQkvKeyTile = 64;
constexpr int kQkvResidentTiles = 4;  // L <= 256 runs with every key tile resident
constexpr int kQkvHandover = kQkvHd / 8 + 1;  // float4s per lane split keys hand over: O's fragments, statistics

// Dynamic shared memory of a block of kWarps warps: in rows of kQkvStride halves, the query groups'
// rows (16 each: its queries, then its output rows; a group per warp, or per pair of warps with
// split keys), then kStages K tiles and kStages V tiles; with split keys, then each group's
// handover (kQkvHandover float4s per lane), apart from the tiles: no barrier of the whole block
// before it is written.
template <int kWarps, int kStages = 2, bool kSplitKeys = false>
constexpr int QkvSharedBytes() {
  constexpr int kGroups = kSplitKeys ? kWarps / 2 : kWarps;
  return (16 * kGroups + 2 * kStages * kQkvKeyTile) * kQkvStride * static_cast<int>(sizeof(__half)) +
         (kSplitKeys ? kGroups * kQkvHandover * 32 * static_cast<int>(sizeof(float4)) : 0);
}

// Whether split keys (8 warps per 64 queries) may replace 4 warps resident (QkvAttentionSplitKeys):
// $SEMVOC_QKV_SPLIT_KEYS=0 says no, for A/B measurements of the two; read once per process.
inline bool QkvSplitKeys() {
  static const bool enabled = !EnvIs("SEMVOC_QKV_SPLIT_KEYS", "0");
  return enabled;
}

// Barrier `id` (1..15; 0 is __syncthreads') of `threads` threads, whole warps: a producer arrives
// and goes on, a consumer waits for every arrival; the writes to shared memory before the arrival
// are visible to the consumer after its wait. An id in a register makes ptxas reserve all 16 for
// the kernel (at most 4 blocks per SM on sm_90: more than split keys' shared memory allows, 2).
__device__ __forceinline__ void QkvBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void QkvBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The q/k heads' LayerNorm affine and the rotation tables.
struct NormRopeTables {
  const __half* gamma = nullptr;  // [2H, 64] (affine_stride 64) or [64] (affine_stride 0)
  const __half* beta = nullptr;
  int affine_stride = 0;
  float eps = 0.f;
  const __half* cos = nullptr;  // [>= L, 32]
  const __half* sin = nullptr;
};

// 32 / kLanes rows of 64 halves in shared memory, kLanes lanes per row: LayerNorm over each row with
// the affine at gamma/beta (statistics in fp32, two passes), then the rotation at positions
// first, first + 1, ... (clamped to L - 1: rows past L are padding), rounded once to fp16 in place.
// Lane i of a row holds dims [64 i / kLanes, +64 / kLanes); the rotation pairs dim j with j + 32,
// which the lane kLanes / 2 away holds at the same index.
template <int kLanes>
__device__ __forceinline__ void NormRopeRows(__half (*rows)[kQkvStride], int lane, const __half* gamma,
                                             const __half* beta, float eps, const __half* cos, const __half* sin,
                                             int first, int length) {
  static_assert(kLanes == 2 || kLanes == 4, "2 or 4 lanes per row");
  constexpr int kPart = kQkvHd / kLanes;
  const int piece = lane % kLanes;
  const bool upper = piece >= kLanes / 2;  // dims 32..63: y' = y cos + partner sin
  __half* part = &rows[lane / kLanes][piece * kPart];
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
#pragma unroll
  for (int step = 1; step < kLanes; step *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
  const float mean = sum / kQkvHd;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < kPart; ++i) squares += (x[i] - mean) * (x[i] - mean);
#pragma unroll
  for (int step = 1; step < kLanes; step *= 2) squares += __shfl_xor_sync(0xffffffffu, squares, step);
  const float rstd = rsqrtf(squares / kQkvHd + eps);
  const int position = min(first + lane / kLanes, length - 1);
  const int angle0 = (piece % (kLanes / 2)) * kPart;  // the table column of this lane's first dim
#pragma unroll
  for (int i = 0; i < kPart / 8; ++i) {
    const Vec<__half, 8> g = *reinterpret_cast<const Vec<__half, 8>*>(gamma + piece * kPart + 8 * i);
    const Vec<__half, 8> b = *reinterpret_cast<const Vec<__half, 8>*>(beta + piece * kPart + 8 * i);
    const int column = position * (kQkvHd / 2) + angle0 + 8 * i;
    const Vec<__half, 8> cs = *reinterpret_cast<const Vec<__half, 8>*>(cos + column);
    const Vec<__half, 8> sn = *reinterpret_cast<const Vec<__half, 8>*>(sin + column);
    Vec<__half, 8> y;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float normed = (x[8 * i + e] - mean) * rstd * __half2float(g.v[e]) + __half2float(b.v[e]);
      const float partner = __shfl_xor_sync(0xffffffffu, normed, kLanes / 2);
      const float c = __half2float(cs.v[e]), s = __half2float(sn.v[e]);
      y.v[e] = __float2half_rn(upper ? normed * c + partner * s : normed * c - partner * s);
    }
    *reinterpret_cast<Vec<__half, 8>*>(part + 8 * i) = y;
  }
  __syncwarp();
}

// The kernel's body, for blocks of kWarps warps with kStages key-tile buffers: 2 (the ring) or
// kQkvResidentTiles (every tile resident: L <= 64 kStages, which the launcher checks); kSplitKeys:
// 8 warps, resident, a pair of warps per 16 queries (see the top). Used by QkvAttentionKernel below;
// the micro-benchmark also builds it under other register limits.
template <int kWarps, int kStages = 2, bool kSplitKeys = false>
__device__ __forceinline__ void QkvAttentionBlock(const __half* __restrict__ qkv, __half* __restrict__ out,
                                                  int length, int heads, const NormRopeTables& tables,
                                                  float scale_log2) {
  static_assert(kStages == 2 || kStages == kQkvResidentTiles, "the ring (2) or every tile resident");
  static_assert(!kSplitKeys || (kWarps == 8 && kStages == kQkvResidentTiles), "split keys: 8 warps, resident");
  constexpr bool kResident = kStages != 2;
  constexpr int kGroups = kSplitKeys ? kWarps / 2 : kWarps;  // query groups of 16
  constexpr int kQueries = 16 * kGroups;
  constexpr int kKeyRowsPerWarp = kQkvKeyTile / kWarps;  // K rows each warp norms per tile
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto* shared_rows = reinterpret_cast<__half(*)[kQkvStride]>(shared_bytes);
  auto k_tile = [&](int buffer) { return shared_rows + kQueries + buffer * kQkvKeyTile; };
  auto v_tile = [&](int buffer) { return shared_rows + kQueries + (kStages + buffer) * kQkvKeyTile; };
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // this warp's query group and key half (split keys: warps w and w + 4 share group w; else half 0)
  const int group = kSplitKeys ? warp % kGroups : warp, key_half = kSplitKeys ? warp / kGroups : 0;
  const int head = blockIdx.y, row = blockIdx.z;
  const int q0 = blockIdx.x * kQueries + group * 16;  // this warp's first query
  const int64_t in_width = static_cast<int64_t>(3) * heads * kQkvHd;
  const int64_t out_width = static_cast<int64_t>(heads) * kQkvHd;
  const __half* base = qkv + static_cast<int64_t>(row) * length * in_width;
  const __half* q_src = base + head * kQkvHd;
  const __half* k_src = base + (heads + head) * kQkvHd;
  const __half* v_src = base + (2 * heads + head) * kQkvHd;
  const int tiles = (length + kQkvKeyTile - 1) / kQkvKeyTile;

  // key tile `tile` of K and V into buffer `buffer`: rows past L are zeros (0 * 0 in PV, never NaN)
  auto stage_tile = [&](int buffer, int tile) {
    for (int chunk = tid; chunk < kQkvKeyTile * 8; chunk += kWarps * 32) {
      const int r = chunk / 8, c = (chunk % 8) * 8, key = tile * kQkvKeyTile + r;
      const int64_t offset = static_cast<int64_t>(min(key, length - 1)) * in_width + c;
      const int bytes = key < length ? 16 : 0;
      CpAsync16(&k_tile(buffer)[r][c], k_src + offset, bytes);
      CpAsync16(&v_tile(buffer)[r][c], v_src + offset, bytes);
    }
  };

  // The ring: group 0 holds the warp's Q rows and key tile 0, group 1 key tile 1 (empty when there
  // is none); every loop turn commits one group more, so "all but the newest group" is always the
  // current tile. Resident: one group, Q and every tile. Split keys: each warp of a pair copies 8
  // of its group's 16 Q rows.
  constexpr int kQueryRowsPerWarp = kSplitKeys ? 8 : 16;
  __half(*qs)[kQkvStride] = shared_rows + group * 16;
#pragma unroll
  for (int i = 0; i < kQueryRowsPerWarp / 4; ++i) {
    const int chunk = lane + 32 * i, r = key_half * kQueryRowsPerWarp + chunk / 8, c = (chunk % 8) * 8,
              query = q0 + r;
    CpAsync16(&qs[r][c], q_src + static_cast<int64_t>(min(query, length - 1)) * in_width + c, query < length ? 16 : 0);
  }
  if constexpr (kResident) {
    for (int tile = 0; tile < tiles; ++tile) stage_tile(tile, tile);
    CpAsyncCommit();
  } else {
    stage_tile(0, 0);
    CpAsyncCommit();
    if (tiles > 1) stage_tile(1, 1);
    CpAsyncCommit();
  }

  const __half* q_gamma = tables.gamma + head * tables.affine_stride;
  const __half* q_beta = tables.beta + head * tables.affine_stride;
  const __half* k_gamma = tables.gamma + (heads + head) * tables.affine_stride;
  const __half* k_beta = tables.beta + (heads + head) * tables.affine_stride;
  const int g = lane / 4, t = lane % 4;  // fragment coordinates: row g (and g + 8), columns 2t, 2t + 1
  const int m = lane / 8;                // ldmatrix: which of the four 8x8 matrices this lane addresses
  uint32_t qa[4][4];                     // Q as A fragments for the 4 k-steps of 16 dims
  float o[kQkvHd / 8][4];                // O: the C fragment of dims 8n .. 8n + 7
#pragma unroll
  for (int n = 0; n < kQkvHd / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};  // rows g, g + 8 (per-thread sums)
  // tile kt's K rows, normed and rotated in place (this warp's share)
  auto norm_keys = [&](int buffer, int kt) {
    NormRopeRows<32 / kKeyRowsPerWarp>(k_tile(buffer) + warp * kKeyRowsPerWarp, lane, k_gamma, k_beta,
                                       tables.eps, tables.cos, tables.sin, kt * kQkvKeyTile + warp * kKeyRowsPerWarp,
                                       length);
  };
  auto norm_queries = [&] {
    NormRopeRows<2>(qs, lane, q_gamma, q_beta, tables.eps, tables.cos, tables.sin, q0, length);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) LdMatrixX4(qa[ks], &qs[lane % 16][ks * 16 + (lane / 16) * 8]);
  };
  if constexpr (kSplitKeys) {
    CpAsyncWait<0>();
    __syncthreads();  // every copy landed
    // the warp's 8 of its group's Q rows, 4 lanes a row (as the K rows)
    NormRopeRows<4>(qs + key_half * 8, lane, q_gamma, q_beta, tables.eps, tables.cos, tables.sin,
                    q0 + key_half * 8, length);
    for (int kt = 0; kt < tiles; ++kt) norm_keys(kt, kt);
    __syncthreads();  // Q and every tile normed: no barrier from here on but the pair's before the merge
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) LdMatrixX4(qa[ks], &qs[lane % 16][ks * 16 + (lane / 16) * 8]);
  } else if constexpr (kResident) {
    CpAsyncWait<0>();
    __syncthreads();  // every copy landed
    norm_queries();
    for (int kt = 0; kt < tiles; ++kt) norm_keys(kt, kt);
    __syncthreads();  // every tile normed: no barrier from here on
  }

  // the key tiles this warp runs: all, or (split keys) the first ceil(tiles / 2) or the rest
  const int kt_begin = kSplitKeys && key_half == 1 ? (tiles + 1) / 2 : 0;
  const int kt_end = kSplitKeys && key_half == 0 ? (tiles + 1) / 2 : tiles;
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int buffer = kResident ? kt : kt & 1;
    if constexpr (!kResident) {
      CpAsyncWait<1>();  // this thread's copies of tile kt (and Q)
      __syncthreads();   // everyone's
      if (kt == 0) norm_queries();
      norm_keys(buffer, kt);
      __syncthreads();  // the whole tile normed
    }

    // logits of the tile: s[j] is the C fragment of keys 8j .. 8j + 7
    float s[kQkvKeyTile / 8][4];
#pragma unroll
    for (int j = 0; j < kQkvKeyTile / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int k16 = 0; k16 < kQkvKeyTile / 16; ++k16)
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        // matrices: keys +0..7 / dims +0..7, keys +0..7 / dims +8..15, keys +8..15 / dims +0..7, +8..15 / +8..15
        uint32_t b[4];
        LdMatrixX4(b, &k_tile(buffer)[k16 * 16 + (m / 2) * 8 + lane % 8][ks * 16 + (m % 2) * 8]);
        MmaF16(s[2 * k16], qa[ks], b[0], b[1]);
        MmaF16(s[2 * k16 + 1], qa[ks], b[2], b[3]);
      }

    // online softmax: the tile's row maxima (a quad of lanes shares a row), rescale what came before
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kQkvKeyTile / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int key = kt * kQkvKeyTile + 8 * j + 2 * t + (c & 1);
        s[j][c] = key < length ? s[j][c] * scale_log2 : -INFINITY;
        tile_max[c / 2] = fmaxf(tile_max[c / 2], s[j][c]);
      }
    float correction[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      // every tile holds key kt * 64 < L, so the new maximum is finite; exp2(-inf) = 0 on the first tile
      const float new_max = fmaxf(run_max[h], tile_max[h]);
      correction[h] = exp2f(run_max[h] - new_max);
      run_max[h] = new_max;
      run_sum[h] *= correction[h];
    }
#pragma unroll
    for (int n = 0; n < kQkvHd / 8; ++n) {
      o[n][0] *= correction[0];
      o[n][1] *= correction[0];
      o[n][2] *= correction[1];
      o[n][3] *= correction[1];
    }
    uint32_t pa[kQkvKeyTile / 16][4];  // P as A fragments, one per 16 keys
#pragma unroll
    for (int k16 = 0; k16 < kQkvKeyTile / 16; ++k16) {
      float p[2][4];
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          p[half][c] = exp2f(s[2 * k16 + half][c] - run_max[c / 2]);
          run_sum[c / 2] += p[half][c];
        }
      pa[k16][0] = PackHalf2(p[0][0], p[0][1]);  // row g, keys 2t, 2t + 1
      pa[k16][1] = PackHalf2(p[0][2], p[0][3]);  // row g + 8
      pa[k16][2] = PackHalf2(p[1][0], p[1][1]);  // row g, keys 8 + 2t, 8 + 2t + 1
      pa[k16][3] = PackHalf2(p[1][2], p[1][3]);
    }

    // O += P V
#pragma unroll
    for (int k16 = 0; k16 < kQkvKeyTile / 16; ++k16)
#pragma unroll
      for (int np = 0; np < kQkvHd / 16; ++np) {
        // transposed matrices: keys +0..7 / dims +0..7, keys +8..15 / dims +0..7, +0..7 / +8..15, +8..15 / +8..15
        uint32_t b[4];
        LdMatrixX4Trans(b, &v_tile(buffer)[k16 * 16 + (m % 2) * 8 + lane % 8][np * 16 + (m / 2) * 8]);
        MmaF16(o[2 * np], pa[k16], b[0], b[1]);
        MmaF16(o[2 * np + 1], pa[k16], b[2], b[3]);
      }

    if constexpr (!kResident) {
      __syncthreads();  // every warp is done with this buffer: refill it with tile kt + 2
      if (kt + 2 < tiles) stage_tile(buffer, kt + 2);
      CpAsyncCommit();
    }
  }

  if constexpr (kSplitKeys) {
    // Warp w + 4 hands its O, maxima and per-thread partial sums (before the quad's sum) to warp w,
    // lane for lane (the same fragment coordinates), through the group's handover: kQkvHandover
    // float4s per lane, lane-minor (conflict-free), apart from the tiles other warps may still read;
    // written by warp w + 4, read by warp w after the pair's barrier. The first half always has a
    // tile (key 0 < L), so the merged maximum is finite; an empty second half (L <= 64) hands over
    // max -inf, sum 0 and O 0, weighted exp2(-inf) = 0.
    float4* handover = reinterpret_cast<float4*>(shared_rows + kQueries + 2 * kStages * kQkvKeyTile) +
                       group * kQkvHandover * 32 + lane;
    if (key_half == 1) {
#pragma unroll
      for (int n = 0; n < kQkvHd / 8; ++n) handover[32 * n] = make_float4(o[n][0], o[n][1], o[n][2], o[n][3]);
      handover[32 * (kQkvHd / 8)] = make_float4(run_max[0], run_max[1], run_sum[0], run_sum[1]);
      QkvBarrierArrive(1 + group, 64);  // after its Q fragments were read: warp w may reuse the rows
      return;
    }
    QkvBarrierSync(1 + group, 64);
    const float4 stats = handover[32 * (kQkvHd / 8)];
    const float their_max[2] = {stats.x, stats.y}, their_sum[2] = {stats.z, stats.w};
    float mine[2], theirs[2];  // each half's weight: exp2 of its maximum less the merged one
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float new_max = fmaxf(run_max[h], their_max[h]);
      mine[h] = exp2f(run_max[h] - new_max);
      theirs[h] = exp2f(their_max[h] - new_max);
      run_sum[h] = run_sum[h] * mine[h] + their_sum[h] * theirs[h];
    }
#pragma unroll
    for (int n = 0; n < kQkvHd / 8; ++n) {
      const float4 their_o = handover[32 * n];
      o[n][0] = o[n][0] * mine[0] + their_o.x * theirs[0];
      o[n][1] = o[n][1] * mine[0] + their_o.y * theirs[0];
      o[n][2] = o[n][2] * mine[1] + their_o.z * theirs[1];
      o[n][3] = o[n][3] * mine[1] + their_o.w * theirs[1];
    }
  }

  // normalise, stage through the warp's Q rows, store 16-byte vectors
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    run_sum[h] += __shfl_xor_sync(0xffffffffu, run_sum[h], 1);
    run_sum[h] += __shfl_xor_sync(0xffffffffu, run_sum[h], 2);
  }
  const float inv[2] = {1.f / run_sum[0], 1.f / run_sum[1]};  // >= 1: the row's maximum key has p = 1
#pragma unroll
  for (int n = 0; n < kQkvHd / 8; ++n) {
    *reinterpret_cast<uint32_t*>(&qs[g][8 * n + 2 * t]) = PackHalf2(o[n][0] * inv[0], o[n][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(&qs[g + 8][8 * n + 2 * t]) = PackHalf2(o[n][2] * inv[1], o[n][3] * inv[1]);
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int chunk = lane + 32 * i, r = chunk / 8, c = (chunk % 8) * 8, query = q0 + r;
    if (query < length)
      *reinterpret_cast<uint4*>(out + (static_cast<int64_t>(row) * length + query) * out_width + head * kQkvHd + c) =
          *reinterpret_cast<const uint4*>(&qs[r][c]);
  }
}

template <int kWarps, int kStages = 2, bool kSplitKeys = false>
__global__ void __launch_bounds__(kWarps * 32) QkvAttentionKernel(const __half* __restrict__ qkv,
                                                                   __half* __restrict__ out, int length, int heads,
                                                                   NormRopeTables tables, float scale_log2) {
  QkvAttentionBlock<kWarps, kStages, kSplitKeys>(qkv, out, length, heads, tables, scale_log2);
}

// What the kernel needs: fp16, hd 64, 16-byte aligned buffers (checked by the op, which refuses the rest).
inline bool QkvAttentionEligible(int64_t hd, std::initializer_list<const void*> buffers) {
  return hd == kQkvHd && Vectorizable<__half>(hd, buffers);
}

// The current GPU's SMs (at least 1).
inline int64_t QkvAttentionSms() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

// Blocks of 8 warps when they still fill every SM of this GPU twice, else of 4 (more, smaller blocks).
inline bool QkvAttentionWideBlocks(int rows, int length, int heads) {
  const int64_t wide_blocks = static_cast<int64_t>((length + 127) / 128) * heads * rows;
  return wide_blocks >= 2 * QkvAttentionSms();
}

// Split keys (L <= 256, not $SEMVOC_QKV_SPLIT_KEYS=0) where its blocks of 64 queries all run at once,
// one per SM (its 134 registers a thread fit one 8-warp block): a second wave costs more than the
// shorter chains save, and 4 warps resident run two blocks per SM (H200, L 250: R 2, 128 blocks,
// 9.0 us against 9.8; R 4, 256 blocks, 17.3 against 14.4).
inline bool QkvAttentionSplitKeys(int rows, int length, int heads) {
  if (length > kQkvResidentTiles * kQkvKeyTile || !QkvSplitKeys()) return false;
  const int64_t blocks = static_cast<int64_t>((length + 63) / 64) * heads * rows;
  return blocks <= QkvAttentionSms();
}

// Blocks of kWarps warps, kStages key-tile buffers (kQkvResidentTiles: L must be at most 64 kStages),
// split keys or not (8 warps, resident: 64 queries per block).
template <int kWarps, int kStages = 2, bool kSplitKeys = false>
void LaunchQkvAttentionBlocks(const __half* qkv, __half* out, int rows, int length, int heads,
                              const NormRopeTables& tables, cudaStream_t stream) {
  constexpr int kBytes = QkvSharedBytes<kWarps, kStages, kSplitKeys>();
  constexpr int kQueries = 16 * (kSplitKeys ? kWarps / 2 : kWarps);
  if (kStages != 2 && length > kStages * kQkvKeyTile)
    throw std::runtime_error("QkvAttention: " + std::to_string(length) + " keys do not fit " +
                             std::to_string(kStages) + " resident tiles");
  if (kBytes > 48 * 1024) {  // above the default limit: opt in, once per device (a host call, no stream work)
    static std::mutex mutex;
    static uint64_t opted_in = 0;  // bit d: device d
    int device = 0;
    cudaGetDevice(&device);
    std::lock_guard<std::mutex> lock(mutex);
    if (device >= 64 || !((opted_in >> device) & 1u)) {
      CheckCuda(cudaFuncSetAttribute(QkvAttentionKernel<kWarps, kStages, kSplitKeys>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes),
                "QkvAttention (shared memory)");
      if (device < 64) opted_in |= uint64_t{1} << device;
    }
  }
  const dim3 grid(static_cast<unsigned>((length + kQueries - 1) / kQueries), static_cast<unsigned>(heads),
                  static_cast<unsigned>(rows));
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(kQkvHd));
  QkvAttentionKernel<kWarps, kStages, kSplitKeys>
      <<<grid, kWarps * 32, kBytes, stream>>>(qkv, out, length, heads, tables, scale_log2);
}

inline void LaunchQkvAttention(const __half* qkv, __half* out, int rows, int length, int heads,
                               const NormRopeTables& tables, cudaStream_t stream) {
  if (QkvAttentionWideBlocks(rows, length, heads))
    LaunchQkvAttentionBlocks<8>(qkv, out, rows, length, heads, tables, stream);
  else if (QkvAttentionSplitKeys(rows, length, heads))
    LaunchQkvAttentionBlocks<8, kQkvResidentTiles, true>(qkv, out, rows, length, heads, tables, stream);
  else if (length <= kQkvResidentTiles * kQkvKeyTile)
    LaunchQkvAttentionBlocks<4, kQkvResidentTiles>(qkv, out, rows, length, heads, tables, stream);
  else
    LaunchQkvAttentionBlocks<4>(qkv, out, rows, length, heads, tables, stream);
}

}  // namespace semvoc
