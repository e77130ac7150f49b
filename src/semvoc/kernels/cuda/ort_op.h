// semvoc's onnxruntime custom ops for the CUDA execution provider: the small C++ layer between
// onnxruntime's C API (version 13: ort_api.h declares the part we use; a build with --ort-include
// takes the official onnxruntime_c_api.h instead) and the kernels. A node's kernel object is the op definition,
// its attributes and, for ops that cache per node (LtGemm's cuBLASLt plans), a state object; every
// launch goes on the stream onnxruntime gives the node (so CUDA-graph capture sees it).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef SEMVOC_OFFICIAL_ORT_HEADER
#include <onnxruntime_c_api.h>
#else
#include "ort_api.h"
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace semvoc {

constexpr uint32_t kOrtApiVersion = 13;  // the oldest API with KernelContext_GetGPUComputeStream (onnxruntime 1.13)
constexpr const char* kDomain = "semvoc.cuda";

const OrtApi* Api();

inline void Check(OrtStatus* status, const char* what) {
  if (status == nullptr) return;
  std::string message = std::string("semvoc.cuda ") + what + ": " + Api()->GetErrorMessage(status);
  Api()->ReleaseStatus(status);
  throw std::runtime_error(message);
}

inline void CheckCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::string message = std::string("semvoc.cuda ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice) {
    message += " (the engine's kernels/libsemvoc_cuda.so was built for another GPU: re-export with "
               "--cuda-arch listing this GPU's compute capability, e.g. 80,86,89,90)";
  } else if (err == cudaErrorInsufficientDriver) {
    message += " (the library was built with a newer CUDA than this NVIDIA driver supports: update the "
               "driver, or re-export with an nvcc of the driver's CUDA version on PATH)";
  }
  throw std::runtime_error(message);
}

struct Tensor {
  void* data = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
};

inline Tensor Describe(OrtValue* value) {
  Tensor t;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  Check(Api()->GetTensorTypeAndShape(value, &info), "GetTensorTypeAndShape");
  size_t rank = 0;
  Check(Api()->GetDimensionsCount(info, &rank), "GetDimensionsCount");
  t.shape.resize(rank);
  Check(Api()->GetDimensions(info, t.shape.data(), rank), "GetDimensions");
  Check(Api()->GetTensorElementType(info, &t.type), "GetTensorElementType");
  Api()->ReleaseTensorTypeAndShapeInfo(info);
  Check(Api()->GetTensorMutableData(value, &t.data), "GetTensorMutableData");
  return t;
}

inline Tensor Input(OrtKernelContext* ctx, size_t index) {
  const OrtValue* value = nullptr;
  Check(Api()->KernelContext_GetInput(ctx, index, &value), "KernelContext_GetInput");
  return Describe(const_cast<OrtValue*>(value));
}

// An optional input: an empty Tensor (data null) when the node leaves it out (onnxruntime gives a
// null value for an omitted or trailing-absent input).
inline Tensor OptionalInput(OrtKernelContext* ctx, size_t index) {
  const OrtValue* value = nullptr;
  Check(Api()->KernelContext_GetInput(ctx, index, &value), "KernelContext_GetInput");
  return value == nullptr ? Tensor{} : Describe(const_cast<OrtValue*>(value));
}

inline Tensor Output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape) {
  OrtValue* value = nullptr;
  Check(Api()->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &value), "KernelContext_GetOutput");
  return Describe(value);
}

inline cudaStream_t Stream(OrtKernelContext* ctx) {
  void* stream = nullptr;
  Check(Api()->KernelContext_GetGPUComputeStream(ctx, &stream), "KernelContext_GetGPUComputeStream");
  return static_cast<cudaStream_t>(stream);
}

inline void Require(bool ok, const std::string& message) {
  if (!ok) throw std::runtime_error("semvoc.cuda " + message);
}

template <typename T> __device__ __forceinline__ float ToFloat(T v);
template <> __device__ __forceinline__ float ToFloat<float>(float v) { return v; }
template <> __device__ __forceinline__ float ToFloat<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T FromFloat(float v);
template <> __device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <> __device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }

// Sum of v over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of `value` over the kWarps warps that hold one row (thread t of the row, t / 32 its
// warp); every thread of the row gets it. `partial`: kWarps floats of shared memory, each slot
// written once per call (give each call of a kernel its own). Several warps synchronise the block:
// every thread of it must make the call.
template <int kWarps>
__device__ __forceinline__ float RowSum(float value, int t, float* partial) {
  value = WarpSum(value);
  if (kWarps == 1) return value;
  const unsigned u = static_cast<unsigned>(t);  // t >= 0: unsigned division is a shift
  if (u % 32 == 0) partial[u / 32] = value;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += partial[w];
  return total;
}

// V elements of T in one aligned load/store (16 bytes for V = 16 / sizeof(T)): elementwise
// kernels over channels-last data read whole vectors when C is a multiple of V.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements of T in a 16-byte vector, and whether tensors of `channels`-wide rows can be read
// in such vectors (every row starts on a vector boundary, and so does every buffer).
template <typename T>
constexpr int WideVector() { return static_cast<int>(16 / sizeof(T)); }

template <typename T>
inline bool Vectorizable(int64_t channels, std::initializer_list<const void*> buffers) {
  if (channels % WideVector<T>() != 0) return false;
  for (const void* p : buffers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

inline unsigned GridFor(int64_t items, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((items + threads - 1) / threads, 1 << 16));
}

// Whether the environment variable `name` is set to `value` (the A/B switches of the ops; their
// callers keep the answer in a static, read once per process).
inline bool EnvIs(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::string(set) == value;
}

// Whether the row-norm ops (GatedSkipNorm, GatedConcatNorm, BiasAddNorm, LayerNorm) give a row
// that fits a block of warps (else one warp per row): $SEMVOC_NORM_ROWS=warp says no, for A/B
// measurements of the two; read once per process.
inline bool NormRowBlocks() {
  static const bool enabled = !EnvIs("SEMVOC_NORM_ROWS", "warp");
  return enabled;
}

// What a node's kernel keeps from its attributes (read once, when onnxruntime creates it).
struct KernelState {
  float epsilon = 0.f;    // ops declared with `epsilon` (or `optional_epsilon`: 0 when absent)
  int64_t layer = 0;      // ops declared with `layer` (0 when the node has none)
  int64_t num_heads = 0;  // ops declared with `num_heads` (required)
  bool relu = false;      // ops declared with `relu` (an optional int attribute, 0 when absent)
  int64_t hop = 0;        // ops declared with `hop` (required)
  bool pred_x1 = false;   // ops declared with `pred_x1` (a required int attribute, 0 or 1)
  int64_t lead = 0;       // ops declared with `lead` (an optional int attribute, 0 when absent)
  void* data = nullptr;   // ops with per-node state (OpDef::create): e.g. LtGemm's cached plans
};

using ComputeFn = void (*)(OrtKernelContext*, const KernelState&);

// One ONNX op of the semvoc.cuda domain: `inputs` inputs and `outputs` outputs, all of `type`
// except input `bool_input` (a bool mask), when there is one.
struct OpDef : OrtCustomOp {
  const char* name;
  ONNXTensorElementDataType type;
  size_t inputs, outputs;
  bool epsilon;    // the node carries a float attribute `epsilon`
  bool layer;      // the node may carry an int attribute `layer`
  bool num_heads;  // the node carries an int attribute `num_heads`
  int bool_input;  // index of a bool input, or -1
  ComputeFn compute;
  size_t required = 0;             // inputs from this index on are optional (0: all required)
  uint32_t float32_inputs = 0;     // bit i: input i is float32 whatever `type` is
  bool relu = false;               // the node may carry an int attribute `relu`
  bool optional_epsilon = false;   // the node may carry a float attribute `epsilon`
  bool hop = false;                // the node carries an int attribute `hop`
  bool pred_x1 = false;            // the node carries an int attribute `pred_x1`
  uint32_t int64_inputs = 0;       // bit i: input i is int64
  uint32_t float32_outputs = 0;    // bit i: output i is float32 whatever `type` is
  bool lead = false;               // the node may carry an int attribute `lead`
  void* (*create)() = nullptr;     // per-node state in KernelState::data, made when the node is
  void (*destroy)(void*) = nullptr;  // created and released with it
};

OpDef MakeOp(const char* name, ONNXTensorElementDataType type, size_t inputs, size_t outputs, ComputeFn compute,
             bool epsilon = false, bool layer = false, bool num_heads = false, int bool_input = -1);

// Dispatch on the element type of input 0 (float32 or float16 engines).
#define SEMVOC_DISPATCH_FLOAT(TYPE, OP_NAME, ...)                                 \
  switch (TYPE) {                                                                 \
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: { using T = float; __VA_ARGS__; break; }    \
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: { using T = __half; __VA_ARGS__; break; } \
    default: throw std::runtime_error(std::string("semvoc.cuda ") + OP_NAME + ": float or float16 only"); \
  }

}  // namespace semvoc
