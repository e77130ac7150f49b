// What the standalone micro-benchmarks of this folder (<op>_bench.cu) share: the CUDA error check,
// the device line they print first, host fp16/fp32 conversions and the CUDA-graph timing loop.
// Included as "bench_common.cuh": a quoted include is looked up beside the including file first,
// so run.sh and tests/test_kernel_bench.py find it without an extra -I.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

// Exits with the CUDA error, the failing call and its file and line.
#define CK(call)                                                                                               \
  do {                                                                                                         \
    cudaError_t err_ = (call);                                                                                 \
    if (err_ != cudaSuccess) {                                                                                 \
      std::fprintf(stderr, "FAIL: CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, __LINE__, \
                   #call);                                                                                     \
      std::exit(1);                                                                                            \
    }                                                                                                          \
  } while (0)

namespace semvoc_bench {

// Prints "device: <name> (sm_XY, N SMs, L2 M MB), driver D, runtime R<suffix>" for device 0, the
// line every bench starts with; `suffix` adds what one bench depends on besides (e.g. cuBLASLt).
inline void PrintDevice(const char* suffix = "") {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int driver = 0, runtime = 0;
  CK(cudaDriverGetVersion(&driver));
  CK(cudaRuntimeGetVersion(&runtime));
  std::printf("device: %s (sm_%d%d, %d SMs, L2 %d MB), driver %d, runtime %d%s\n", prop.name, prop.major,
              prop.minor, prop.multiProcessorCount, prop.l2CacheSize >> 20, driver, runtime, suffix);
}

// One fp16 unit in the last place of |v| (2^-24 below the normal range): the unit of the benches'
// fp16 tolerances.
inline double Ulp16(double v) {
  v = std::fabs(v);
  if (v < 6.103515625e-05) return 5.9604644775390625e-08;
  int exponent;
  std::frexp(v, &exponent);  // v = m 2^exponent, m in [0.5, 1)
  return std::ldexp(1.0, exponent - 11);
}

// A result's errors against a double reference: the largest absolute error, and the largest in
// units of its fp16 tolerance (one fp16 ulp at the reference value plus `slack`); a check passes
// at worst <= 1. A non-finite result counts as an infinite error.
struct Fp16Errors {
  double err = 0, worst = 0;
  void Add(double got, double ref, double slack) {
    const double e = std::isfinite(got) ? std::fabs(got - ref) : INFINITY;
    err = std::max(err, e);
    worst = std::max(worst, e / (Ulp16(ref) + slack));
  }
};

// Host-side conversions for a bench templated on its element type T (float or __half).
template <typename T> float ToHost(T v);
template <> inline float ToHost<float>(float v) { return v; }
template <> inline float ToHost<__half>(__half v) { return __half2float(v); }
template <typename T> T FromHost(float v);
template <> inline float FromHost<float>(float v) { return v; }
template <> inline __half FromHost<__half>(float v) { return __float2half_rn(v); }

// Median microseconds per call of `launch(call, stream)`, call = 0 .. calls - 1: the calls are
// captured back to back into one CUDA graph (host launch overhead does not count), the graph is
// replayed `warmup` times, then `replays` replays are timed with CUDA events; the median replay
// time is divided by `calls`. `launch` picks its buffers from `call` (e.g. rotating sets so that
// the inputs come from HBM, or always the same set for L2-hot).
template <typename Launch>
double GraphUsPerCall(const Launch& launch, int calls, int replays, int warmup, cudaStream_t stream) {
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int call = 0; call < calls; ++call) launch(call, stream);
  CK(cudaStreamEndCapture(stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  for (int w = 0; w < warmup; ++w) CK(cudaGraphLaunch(exec, stream));
  std::vector<float> times;
  for (int rep = 0; rep < replays; ++rep) {
    CK(cudaEventRecord(start, stream));
    CK(cudaGraphLaunch(exec, stream));
    CK(cudaEventRecord(stop, stream));
    CK(cudaEventSynchronize(stop));
    float ms;
    CK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const double us = times[times.size() / 2] * 1e3 / calls;
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  return us;
}

}  // namespace semvoc_bench
