// GatedConcatNorm, BiasAddNorm, LayerNorm: the DiT's U-Net skip path and its LayerNorms.
//   GatedConcatNorm: x, out, skip [..., D]; gate, gbias [D]; gamma, beta [2D] -> h [..., 2D]
//     h = LayerNorm([x + out * gate + gbias, skip]) * gamma + beta
//   BiasAddNorm: y [..., D]; bias, gamma, beta [D] -> h, sum [..., D]
//     sum = y + bias; h = LayerNorm(sum) * gamma + beta
//   LayerNorm: x [..., D]; gamma, beta [D] -> h = LayerNorm(x) * gamma + beta
// Attribute epsilon. In onnxruntime's stock ops a skip block's input is a Mul, Adds, a Concat, a
// LayerNormalization over 2D, the GEMM's bias Add and a LayerNormalization over D: 6+ kernels and
// as many passes over memory; here 2 kernels, each input read once. The kernels are in
// skip_norm_kernel.cuh (shared with benchmarks/device/kernel_bench/skip_norm_bench.cu).
// Reference: semvoc/kernels/skip_norm.py.
#include "skip_norm_kernel.cuh"

namespace semvoc {

static int64_t RowsOf(const Tensor& t, int64_t width) { return width == 0 ? 0 : t.numel() / width; }

static void RequireWidth(bool launched, const char* name, const Tensor& t, int64_t width) {
  if (launched) return;
  SEMVOC_DISPATCH_FLOAT(t.type, name,
    Require(false, std::string(name) + ": rows of " + std::to_string(width) + " elements; at most " +
                   std::to_string(SkipNormMaxWidth<T>(true)) + " when it is a multiple of " +
                   std::to_string(WideVector<T>()) + ", else " + std::to_string(SkipNormMaxWidth<T>(false))));
}

void GatedConcatNormCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor x = Input(ctx, 0), out = Input(ctx, 1), gate = Input(ctx, 2), gbias = Input(ctx, 3),
               skip = Input(ctx, 4), gamma = Input(ctx, 5), beta = Input(ctx, 6);
  Require(!x.shape.empty() && x.shape == out.shape && x.shape == skip.shape,
          "GatedConcatNorm: x, out and skip must have the same shape [..., D]");
  const int64_t width = x.dim(-1);
  Require(gate.numel() == width && gbias.numel() == width, "GatedConcatNorm: gate and gbias must be [D]");
  Require(gamma.numel() == 2 * width && beta.numel() == 2 * width, "GatedConcatNorm: gamma and beta must be [2D]");
  std::vector<int64_t> shape = x.shape;
  shape.back() *= 2;
  Tensor h = Output(ctx, 0, shape);
  const int64_t rows = RowsOf(x, width);
  if (rows == 0) return;
  bool launched = false;
  SEMVOC_DISPATCH_FLOAT(x.type, "GatedConcatNorm",
    launched = LaunchGatedConcatNorm<T>(
        static_cast<const T*>(x.data), static_cast<const T*>(out.data), static_cast<const T*>(gate.data),
        static_cast<const T*>(gbias.data), static_cast<const T*>(skip.data), static_cast<const T*>(gamma.data),
        static_cast<const T*>(beta.data), static_cast<T*>(h.data), rows, static_cast<int>(width), state.epsilon,
        Stream(ctx)));
  RequireWidth(launched, "GatedConcatNorm", x, width);
  CheckCuda(cudaGetLastError(), "GatedConcatNorm launch");
}

void BiasAddNormCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor y = Input(ctx, 0), bias = Input(ctx, 1), gamma = Input(ctx, 2), beta = Input(ctx, 3);
  Require(!y.shape.empty(), "BiasAddNorm: y must be [..., D]");
  const int64_t width = y.dim(-1);
  Require(bias.numel() == width && gamma.numel() == width && beta.numel() == width,
          "BiasAddNorm: bias, gamma and beta must be [D]");
  Tensor h = Output(ctx, 0, y.shape), sum = Output(ctx, 1, y.shape);
  const int64_t rows = RowsOf(y, width);
  if (rows == 0) return;
  bool launched = false;
  SEMVOC_DISPATCH_FLOAT(y.type, "BiasAddNorm",
    launched = (LaunchBiasAddNorm<T, true, true>(
        static_cast<const T*>(y.data), static_cast<const T*>(bias.data), static_cast<const T*>(gamma.data),
        static_cast<const T*>(beta.data), static_cast<T*>(h.data), static_cast<T*>(sum.data), rows,
        static_cast<int>(width), state.epsilon, Stream(ctx))));
  RequireWidth(launched, "BiasAddNorm", y, width);
  CheckCuda(cudaGetLastError(), "BiasAddNorm launch");
}

void LayerNormCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor x = Input(ctx, 0), gamma = Input(ctx, 1), beta = Input(ctx, 2);
  Require(!x.shape.empty(), "LayerNorm: x must be [..., D]");
  const int64_t width = x.dim(-1);
  Require(gamma.numel() == width && beta.numel() == width, "LayerNorm: gamma and beta must be [D]");
  Tensor h = Output(ctx, 0, x.shape);
  const int64_t rows = RowsOf(x, width);
  if (rows == 0) return;
  bool launched = false;
  SEMVOC_DISPATCH_FLOAT(x.type, "LayerNorm",
    launched = (LaunchBiasAddNorm<T, false, false>(
        static_cast<const T*>(x.data), nullptr, static_cast<const T*>(gamma.data),
        static_cast<const T*>(beta.data), static_cast<T*>(h.data), nullptr, rows, static_cast<int>(width),
        state.epsilon, Stream(ctx))));
  RequireWidth(launched, "LayerNorm", x, width);
  CheckCuda(cudaGetLastError(), "LayerNorm launch");
}

}  // namespace semvoc
