// SplitMlp: the vocoder block's MLP in the PReLU split form (semvoc/kernels/prelu_split.py) as two
// cuBLASLt calls over one buffer, where LtGemm needed three:
//   r   = relu(y w1 + b1)                   written into wide[:, :H]   (cuBLASLt's RELU_BIAS epilogue)
//   out = [r | y] w2 + bias + residual      one GEMM with K = H + C    (bias epilogue, residual as C)
// w2 = [R; M] stacks the split's relu part R [H, C] over its linear part M [C, C], so the second
// call is the two GEMMs `t = y M + bias + residual` and `out = r R + t` in one, rounded once.
// Inputs: wide [..., H + C] (ConvNeXtMix with lead = H: y in its last C columns, the first H
// unwritten), w1 [C, H], b1 [H], w2 [H + C, C], bias [C], residual [..., C]. Output [..., C].
// The op writes r into wide's first H columns: that input is ConvNeXtMix's output, read by this
// node only, and those columns are scratch by ConvNeXtMix's contract (its `lead`).
// Reference: semvoc/kernels/split_mlp.py (split_mlp_reference).
#include "ltgemm_kernel.cuh"

namespace semvoc {

struct SplitMlpState {
  LtGemmInstance<float> up32, out32;
  LtGemmInstance<__half> up16, out16;
};

void* SplitMlpCreate() { return new SplitMlpState; }
void SplitMlpDestroy(void* state) { delete static_cast<SplitMlpState*>(state); }

void SplitMlpCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor wide = Input(ctx, 0), w1 = Input(ctx, 1), b1 = Input(ctx, 2), w2 = Input(ctx, 3), bias = Input(ctx, 4),
               residual = Input(ctx, 5);
  Require(!wide.shape.empty() && w1.shape.size() == 2 && w2.shape.size() == 2,
          "SplitMlp: wide must be [..., H + C], w1 [C, H] and w2 [H + C, C]");
  const int64_t channels = w1.dim(0), hidden = w1.dim(1);
  Require(channels > 0 && hidden > 0, "SplitMlp: w1 must be [C, H] with C, H >= 1");
  Require(wide.dim(-1) == hidden + channels, "SplitMlp: wide's last dim (" + std::to_string(wide.dim(-1)) +
                                                 ") must be H + C = " + std::to_string(hidden + channels));
  Require(w2.dim(0) == hidden + channels && w2.dim(1) == channels, "SplitMlp: w2 must be [H + C, C]");
  Require(b1.numel() == hidden && bias.numel() == channels, "SplitMlp: b1 must be [H] and bias [C]");
  std::vector<int64_t> out_shape = wide.shape;
  out_shape.back() = channels;
  Require(residual.shape == out_shape, "SplitMlp: residual must be [..., C], the output's shape");
  Tensor out = Output(ctx, 0, out_shape);
  if (out.numel() == 0) return;
  const int64_t rows = wide.numel() / (hidden + channels);
  const size_t element = wide.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2 : 4;

  LtGemmArgs up;  // r = relu(y w1 + b1), from wide's last C columns into its first H
  up.a = static_cast<const char*>(wide.data) + hidden * element;
  up.lda = hidden + channels;
  up.w = w1.data;
  up.bias = b1.data;
  up.out = wide.data;  // the scratch columns (see the header)
  up.ldo = hidden + channels;
  up.m = rows;
  up.n = hidden;
  up.k = channels;
  up.relu = true;
  up.rerunnable = true;  // it reads y's columns and writes the others: a second call repeats the first
  LtGemmArgs down;  // out = [r | y] w2 + bias + residual
  down.a = wide.data;
  down.w = w2.data;
  down.bias = bias.data;
  down.residual = residual.data;
  down.out = out.data;
  down.m = rows;
  down.n = channels;
  down.k = hidden + channels;
  SplitMlpState* s = static_cast<SplitMlpState*>(state.data);
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(wide.type, "SplitMlp",
      if constexpr (sizeof(T) == 4) {
        s->up32.Run(up, stream);
        s->out32.Run(down, stream);
      } else {
        s->up16.Run(up, stream);
        s->out16.Run(down, stream);
      });
}

}  // namespace semvoc
