// ConvNeXtMix: the front half of the vocoder's ConvNeXt block in one kernel, channels-last.
//   y   = depthwise_conv1d(x, weight, bias) along L        (kernel K, "same" zero padding)
//   y   = y * mean_c((y - norm_bias)^2) ** -0.5 * exp(log_scale)   (BiasNorm over channels)
//   out = (y + cond_bias) * time_scale
// Inputs: x [B, L, C], weight [C, 1, K], bias [C], norm_bias [C], log_scale [1],
// cond_bias [B|1, L, C] or a whole table [N, B|1, L, C], time_scale [B|1, C] or a table row
// [B|1, N, C]. With tables, the int attribute `layer` picks entry `layer` of both: the step graph
// hands every block the branch's tables as they are (a Split into N copies cost 0.7 ms per
// vocoder step at batch 16). Output [B, L, lead + C] (int attribute `lead`, 0 when absent): each
// row's C values come after `lead` columns that this op leaves unwritten, for SplitMlp to fill
// (split_mlp.cu). Arithmetic and statistics in fp32.
// Reference: semvoc/kernels/convnext_mix.py (convnext_mix_reference).
//
// Kernels: convnext_mix_kernel.cuh (shared with benchmarks/device/kernel_bench/convnext_mix_bench.cu,
// which times them against the first kernel). In onnxruntime's stock ops this was ~12 kernels per
// block (cuDNN depthwise conv and its bias, the fp32 BiasNorm chain, the condition add and the
// time scale).
#include "convnext_mix_kernel.cuh"

namespace semvoc {

// true launches the first kernel (one block of 256 threads per 8 frames) instead of the run kernel
constexpr bool kMixUseFirstKernel = false;

template <typename T, int K>
static void Launch(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& norm_bias,
                   const Tensor& log_scale, const Tensor& cond, const Tensor& scale, Tensor& out,
                   int64_t cond_stride, int64_t scale_stride, int64_t lead, cudaStream_t stream) {
  const MixArgs<T> args{static_cast<const T*>(x.data), static_cast<const T*>(weight.data),
                        static_cast<const T*>(bias.data), static_cast<const T*>(norm_bias.data),
                        static_cast<const T*>(log_scale.data), static_cast<const T*>(cond.data),
                        static_cast<const T*>(scale.data), static_cast<T*>(out.data) + lead,
                        static_cast<int>(x.dim(2)), static_cast<int>(x.dim(1)), cond_stride, scale_stride,
                        static_cast<int>(out.dim(2))};
  if (kMixUseFirstKernel) {
    LaunchMixFirst<T, K>(args, static_cast<int>(x.dim(0)), stream);
  } else {
    LaunchMixShipped<T, K>(args, static_cast<int>(x.dim(0)), stream);
  }
}

void ConvNeXtMixCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor x = Input(ctx, 0), weight = Input(ctx, 1), bias = Input(ctx, 2), norm_bias = Input(ctx, 3),
               log_scale = Input(ctx, 4), cond = Input(ctx, 5), scale = Input(ctx, 6);
  Require(x.shape.size() == 3, "ConvNeXtMix: x must be [B, L, C]");
  const int64_t batch = x.dim(0), length = x.dim(1), channels = x.dim(2);
  const int64_t taps = weight.dim(-1);
  Require(channels <= kMixMaxChannels, "ConvNeXtMix: at most 1024 channels");
  const int64_t lead = state.lead;
  Require(lead >= 0, "ConvNeXtMix: attribute lead must be >= 0");
  Require(length * (lead + channels) < (int64_t{1} << 31), "ConvNeXtMix: L * (lead + C) must fit in 32 bits");
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
  Tensor out = Output(ctx, 0, {batch, length, lead + channels});
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
      case 3: Launch<T, 3>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, lead, stream); break;
      case 5: Launch<T, 5>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, lead, stream); break;
      case 7: Launch<T, 7>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, lead, stream); break;
      case 9: Launch<T, 9>(x, weight, bias, norm_bias, log_scale, cond_layer, scale_layer, out, cond_stride, scale_stride, lead, stream); break;
      default: Require(false, "ConvNeXtMix: kernel sizes 3, 5, 7 and 9 are built (add yours in convnext_mix.cu)");
    });
  CheckCuda(cudaGetLastError(), "ConvNeXtMix launch");
}

}  // namespace semvoc
