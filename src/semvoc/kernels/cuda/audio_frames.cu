// AudioFrames: a vocoder branch's STFT frames straight from the waveform:
//   out[b, f, j] = x[b, reflect(f * hop + j - hop)],  f in [0, L / hop], j in [0, 2 hop),
// where reflect(i) mirrors i about the first and last samples (torch.stft's centred "reflect"
// padding with n_fft = 2 hop). Input: x [B, L] with L a multiple of hop and hop < L (the step's
// waveform in the decoder's dtype, cast once for every branch). Attribute hop.
// Output: [B, L / hop + 1, 2 hop]. Replaces a Pad, a Gather, two Slices and a Concat per branch
// (the exported semvoc.kernels.stft.frame_halves). Reference: semvoc/kernels/audio_frames.py.
#include "ort_op.h"

namespace semvoc {

// One thread per V consecutive outputs of a frame (16-byte stores when 2 hop allows).
template <typename T, int V>
__global__ void AudioFramesKernel(const T* __restrict__ audio, T* __restrict__ out, int64_t vectors, int length,
                                  int hop, int frames) {
  const int width = 2 * hop;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t element = i * V, row = element / width;
    const int j = static_cast<int>(element % width);
    const int64_t b = row / frames;
    const int f = static_cast<int>(row % frames);
    const T* samples = audio + b * length;
    Vec<T, V> result;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      int a = f * hop + j + k - hop;
      a = a < 0 ? -a : a;
      a = a >= length ? 2 * (length - 1) - a : a;
      result.v[k] = samples[a];
    }
    reinterpret_cast<Vec<T, V>*>(out)[i] = result;
  }
}

template <typename T, int V>
static void Launch(const Tensor& audio, Tensor& out, int hop, cudaStream_t stream) {
  const int64_t vectors = out.numel() / V;
  AudioFramesKernel<T, V><<<GridFor(vectors, 256), 256, 0, stream>>>(
      static_cast<const T*>(audio.data), static_cast<T*>(out.data), vectors, static_cast<int>(audio.dim(1)), hop,
      static_cast<int>(out.dim(1)));
}

void AudioFramesCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor audio = Input(ctx, 0);
  const int64_t hop = state.hop;
  Require(audio.shape.size() == 2, "AudioFrames: x must be [B, L]");
  const int64_t length = audio.dim(1);
  Require(hop > 0 && hop < length && length % hop == 0,
          "AudioFrames: the attribute hop must be positive, below L and divide L (L = " + std::to_string(length) +
              ", hop = " + std::to_string(hop) + ")");
  Require(audio.numel() * 2 + 2 * hop * audio.dim(0) < (int64_t{1} << 31), "AudioFrames: at most 2^30 samples");
  Tensor out = Output(ctx, 0, {audio.dim(0), length / hop + 1, 2 * hop});
  if (out.numel() == 0) return;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(audio.type, "AudioFrames",
      if (Vectorizable<T>(2 * hop, {out.data})) Launch<T, WideVector<T>()>(audio, out, static_cast<int>(hop), stream);
      else Launch<T, 1>(audio, out, static_cast<int>(hop), stream));
  CheckCuda(cudaGetLastError(), "AudioFrames launch");
}

}  // namespace semvoc
