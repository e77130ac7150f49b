// ConvNeXtMix: the front half of the vocoder's ConvNeXt block in one kernel, channels-last.
//   y   = depthwise_conv1d(x, weight, bias) along L        (kernel K, "same" zero padding)
//   y   = y * mean_c((y - norm_bias)^2) ** -0.5 * exp(log_scale)   (BiasNorm over channels)
//   out = (y + cond_bias) * time_scale
// Inputs: x [B, L, C], weight [C, 1, K], bias [C], norm_bias [C], log_scale [1],
// cond_bias [B|1, L, C] or a whole table [N, B|1, L, C], time_scale [B|1, C] or a table row
// [B|1, N, C]. With tables, the int attribute `layer` picks entry `layer` of both: the step graph
// hands every block the branch's tables as they are (a Split into N copies cost 0.7 ms per
// vocoder step at batch 16). Output [B, L, C]. Arithmetic and statistics in fp32.
// Reference: semvoc/kernels/convnext_mix.py (convnext_mix_reference).
//
// One block of 256 threads per (8 frames, batch row). A thread owns up to 4 channels (C <= 1024):
// it reads each channel's 8 + K - 1 input frames once (coalesced: channels are contiguous),
// keeps the 8 conv outputs in registers, and the block reduces the per-frame sums of squares
// (warp shuffles, then shared memory) before the scaled outputs are written. In onnxruntime's
// stock ops this was ~12 kernels per block (cuDNN depthwise conv and its bias, the fp32 BiasNorm
// chain, the condition add and the time scale).
#include "ort_op.h"

namespace semvoc {

constexpr int kMixFrames = 8;
constexpr int kMixThreads = 256;
constexpr int kMixChannelsPerThread = 4;
constexpr int kMixMaxChannels = kMixThreads * kMixChannelsPerThread;

template <typename T, int K>
__global__ void __launch_bounds__(kMixThreads)
ConvNeXtMixKernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                  const T* __restrict__ norm_bias, const T* __restrict__ log_scale, const T* __restrict__ cond,
                  const T* __restrict__ scale, T* __restrict__ out, int channels, int length,
                  int64_t cond_stride, int64_t scale_stride) {
  __shared__ float partial[kMixThreads / 32][kMixFrames];
  __shared__ float inv_norm[kMixFrames];
  const int b = blockIdx.y;
  const int t0 = blockIdx.x * kMixFrames;
  const int64_t row = static_cast<int64_t>(channels);
  const T* xb = x + static_cast<int64_t>(b) * length * row;

  float y[kMixChannelsPerThread][kMixFrames];
  float sumsq[kMixFrames];
#pragma unroll
  for (int f = 0; f < kMixFrames; ++f) sumsq[f] = 0.f;

#pragma unroll
  for (int j = 0; j < kMixChannelsPerThread; ++j) {
    const int c = threadIdx.x + j * kMixThreads;
    if (c < channels) {
      float window[kMixFrames + K - 1];
#pragma unroll
      for (int i = 0; i < kMixFrames + K - 1; ++i) {
        const int s = t0 - K / 2 + i;
        window[i] = (s >= 0 && s < length) ? ToFloat(xb[s * row + c]) : 0.f;
      }
      float w[K];
#pragma unroll
      for (int k = 0; k < K; ++k) w[k] = ToFloat(weight[c * K + k]);
      const float conv_bias = ToFloat(bias[c]), centre = ToFloat(norm_bias[c]);
#pragma unroll
      for (int f = 0; f < kMixFrames; ++f) {
        float acc = conv_bias;
#pragma unroll
        for (int k = 0; k < K; ++k) acc += w[k] * window[f + k];
        y[j][f] = acc;
        const float d = acc - centre;
        sumsq[f] += d * d;
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int f = 0; f < kMixFrames; ++f) {
    const float v = WarpSum(sumsq[f]);
    if (lane == 0) partial[warp][f] = v;
  }
  __syncthreads();
  if (threadIdx.x < kMixFrames) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kMixThreads / 32; ++w) total += partial[w][threadIdx.x];
    inv_norm[threadIdx.x] = rsqrtf(total / channels) * expf(ToFloat(log_scale[0]));
  }
  __syncthreads();

  const T* cb = cond + b * cond_stride;
  const T* sb = scale + b * scale_stride;
  T* ob = out + static_cast<int64_t>(b) * length * row;
#pragma unroll
  for (int j = 0; j < kMixChannelsPerThread; ++j) {
    const int c = threadIdx.x + j * kMixThreads;
    if (c < channels) {
      const float time_scale = ToFloat(sb[c]);
#pragma unroll
      for (int f = 0; f < kMixFrames; ++f) {
        const int t = t0 + f;
        if (t < length) {
          const int64_t i = t * row + c;
          ob[i] = FromFloat<T>((y[j][f] * inv_norm[f] + ToFloat(cb[i])) * time_scale);
        }
      }
    }
  }
}

template <typename T, int K>
static void Launch(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& norm_bias,
                   const Tensor& log_scale, const Tensor& cond, const Tensor& scale, Tensor& out,
                   int64_t cond_stride, int64_t scale_stride, cudaStream_t stream) {
  const int64_t batch = x.dim(0), length = x.dim(1), channels = x.dim(2);
  const dim3 grid(static_cast<unsigned>((length + kMixFrames - 1) / kMixFrames), static_cast<unsigned>(batch));
  ConvNeXtMixKernel<T, K><<<grid, kMixThreads, 0, stream>>>(
      static_cast<const T*>(x.data), static_cast<const T*>(weight.data), static_cast<const T*>(bias.data),
      static_cast<const T*>(norm_bias.data), static_cast<const T*>(log_scale.data), static_cast<const T*>(cond.data),
      static_cast<const T*>(scale.data), static_cast<T*>(out.data), static_cast<int>(channels),
      static_cast<int>(length), cond_stride, scale_stride);
}

void ConvNeXtMixCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor x = Input(ctx, 0), weight = Input(ctx, 1), bias = Input(ctx, 2), norm_bias = Input(ctx, 3),
               log_scale = Input(ctx, 4), cond = Input(ctx, 5), scale = Input(ctx, 6);
  Require(x.shape.size() == 3, "ConvNeXtMix: x must be [B, L, C]");
  const int64_t batch = x.dim(0), length = x.dim(1), channels = x.dim(2);
  const int64_t taps = weight.dim(-1);
  Require(channels <= kMixMaxChannels, "ConvNeXtMix: at most 1024 channels");
  Require(length * channels < (int64_t{1} << 31), "ConvNeXtMix: L * C must fit in 32 bits");
  Require(weight.numel() == channels * taps, "ConvNeXtMix: weight must be [C, 1, K]");
  Require(bias.numel() == channels && norm_bias.numel() == channels && log_scale.numel() == 1,
          "ConvNeXtMix: bias/norm_bias must be [C], log_scale one value");
  const bool cond_table = cond.shape.size() == 4, scale_table = scale.shape.size() == 3;
  const int64_t layer = state.layer;
  Require((cond.shape.size() == 3 || cond_table) && cond.dim(-2) == length && cond.dim(-1) == channels &&
              (cond.dim(-3) == batch || cond.dim(-3) == 1) && (!cond_table || layer < cond.dim(0)),
          "ConvNeXtMix: cond_bias must be [B or 1, L, C], or a table [N, B or 1, L, C] with layer < N");
  Require(scale.dim(-1) == channels && (scale.numel() / channels == (scale_table ? scale.dim(1) : 1) ||
                                        scale.numel() / channels == batch * (scale_table ? scale.dim(1) : 1)) &&
              (!scale_table || layer < scale.dim(1)),
          "ConvNeXtMix: time_scale must be [B or 1, C], or a table [B or 1, N, C] with layer < N");
  Require(layer >= 0 && (layer == 0 || cond_table), "ConvNeXtMix: attribute layer needs a cond_bias table");
  Tensor out = Output(ctx, 0, x.shape);
  if (x.numel() == 0) return;
  const int64_t cond_batch = cond.dim(-3);
  const int64_t cond_stride = cond_batch == 1 ? 0 : length * channels;
  const int64_t scale_rows = scale_table ? scale.dim(1) : 1;
  const int64_t scale_stride = scale.numel() == channels * scale_rows ? 0 : channels * scale_rows;
  // entry `layer` of each table: plain pointer offsets, so the kernel is the same
  Tensor cond_layer = cond, scale_layer = scale;
  const size_t element = x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2 : 4;
  if (cond_table) cond_layer.data = static_cast<char*>(cond.data) + layer * cond_batch * length * channels * element;
  if (scale_table) scale_layer.data = static_cast<char*>(scale.data) + layer * channels * element;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(x.type, "ConvNeXtMix",
    switch (taps) {
      case 3: Launch<T, 3>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, stream); break;
      case 5: Launch<T, 5>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, stream); break;
      case 7: Launch<T, 7>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, stream); break;
      case 9: Launch<T, 9>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, stream); break;
      default: Require(false, "ConvNeXtMix: kernel sizes 3, 5, 7 and 9 are built (add yours in convnext_mix.cu)");
    });
  CheckCuda(cudaGetLastError(), "ConvNeXtMix launch");
}

}  // namespace semvoc
