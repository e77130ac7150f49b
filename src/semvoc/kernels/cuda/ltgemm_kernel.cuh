// LtGemm's code path, shared by the library (ltgemm.cu) and the micro-benchmark
// (benchmarks/device/kernel_bench/ltgemm_bench.cu), so that what the bench times is what ships.
//
//   out[m, n] = act(sum_k a[m, k] w[k, n]  (+ bias[n])  (+ residual[m, n] (* scale[n])))
//   act = max(., 0) when the node says relu = 1 (cuBLASLt's RELU epilogue), else the identity
//
// a [M, K], w [K, N] (the layout of a MatMul's B: how the graphs hold F.linear's transposed
// weight), out and residual [M, N], row-major; bias [N] of the same type; scale [N] float32.
// a's rows may lie lda >= K elements apart and out's ldo >= N (SplitMlp reads and writes column
// ranges of one wider buffer); a strided out takes the epilogue in the GEMM only (level 1 below).
// fp16 or fp32 data, fp32 accumulation (CUBLAS_COMPUTE_32F), one cublasLtMatmul per call:
// row-major out = a w is column-major out^T = w^T a^T, so A = w (N x K, ld N), B = a (K x M, ld K),
// C = D = out (N x M, ld N), no transposes (as benchmarks/device/gemm measured).
//
// The epilogue does what cuBLASLt offers for it, tried in this order when a shape is first seen:
//   1. everything in the GEMM: bias as CUBLASLT_EPILOGUE_BIAS (RELU_BIAS, or RELU without a bias,
//      with relu), the residual as C; with scale, alpha and beta as per-row device vectors
//      (CUBLASLT_POINTER_MODE_DEVICE_VECTOR: alpha = ones, beta = scale; rows of the column-major D
//      are the N channels), else beta = 1 from the host;
//   2. bias in the GEMM, the residual (* scale) added by LtTailKernel after it (not with relu:
//      cuBLASLt's relu would come before the residual);
//   3. a plain GEMM, bias, residual and relu in LtTailKernel.
// ($SEMVOC_LTGEMM_FUSION=2 or 3 starts the list there: for tests and A/B measurements.)
// The first level that cuBLASLt's heuristic has algorithms for is kept, with the handle,
// descriptors and workspace, per op instance and (M, N, K, stream, alignment). Of the heuristic's
// candidates the plan runs the one recorded for it, else the fastest on this call's buffers, else
// its first guess (ltgemm_choices.h: timed once, recorded in $SEMVOC_LTGEMM_ALGORITHMS).
// That happens on the first call for a shape, which in semvoc's runtime is an uncaptured warm-up
// run; a first call inside CUDA-graph capture is refused (it would allocate). Later calls only set
// the bias pointer on the descriptor and enqueue cublasLtMatmul (+ the tail kernel) on the given
// stream: no allocation, no synchronisation, no host copy, so they can be captured and replayed.
//
// cuBLASLt is not linked: its entry points are resolved with dlopen("libcublasLt.so.13"), which
// onnxruntime-gpu's CUDA provider has already loaded into the process (cublaslt_api.h declares them).
//
// Workspace: one buffer of kLtWorkspaceBytes per (device, stream), shared by every LtGemm node that
// runs on that stream (nodes of one stream never run at the same time, so they can share it) and
// freed with the last node that holds it. A per-node buffer would cost ~150 x 32 MiB in a DiT step.
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cublaslt_api.h"
#include "ltgemm_choices.h"
#include "ort_op.h"

namespace semvoc {

constexpr const char* kCublasLtLibrary = "libcublasLt.so.13";
// What onnxruntime's CUDA EP (and benchmarks/device/gemm) give cuBLASLt: the heuristic may pick
// split-K or stream-K kernels that need some of it.
constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;
constexpr int kLtMaxVectorRows = 1 << 16;  // the alpha vector of ones: N up to this uses mode 1 with a scale

struct LtLibrary {
  lt::CreateFn Create;
  lt::GetStatusStringFn GetStatusString;
  lt::GetVersionFn GetVersion;
  lt::MatmulDescCreateFn MatmulDescCreate;
  lt::MatmulDescDestroyFn MatmulDescDestroy;
  lt::MatmulDescSetAttributeFn MatmulDescSetAttribute;
  lt::MatrixLayoutCreateFn MatrixLayoutCreate;
  lt::MatrixLayoutDestroyFn MatrixLayoutDestroy;
  lt::PreferenceCreateFn PreferenceCreate;
  lt::PreferenceDestroyFn PreferenceDestroy;
  lt::PreferenceSetAttributeFn PreferenceSetAttribute;
  lt::AlgoGetHeuristicFn AlgoGetHeuristic;
  lt::MatmulFn Matmul;
};

// The library's entry points, resolved once per process (a failed attempt is retried on the next call).
inline const LtLibrary& LtApi() {
  static const LtLibrary library = [] {
    void* handle = dlopen(kCublasLtLibrary, RTLD_NOW | RTLD_NOLOAD);  // already loaded by onnxruntime's CUDA EP
    if (handle == nullptr) handle = dlopen(kCublasLtLibrary, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      throw std::runtime_error(std::string("semvoc.cuda LtGemm: cannot load ") + kCublasLtLibrary + " (" +
                               (why ? why : "not found") + "): install cuBLAS 13 (pip install nvidia-cublas, "
                               "which onnxruntime-gpu's CUDA 13 build uses) or re-export with "
                               "SEMVOC_EXPORT_WITHOUT=LtGemm");
    }
    auto symbol = [handle](const char* name) {
      void* p = dlsym(handle, name);
      if (p == nullptr) {
        throw std::runtime_error(std::string("semvoc.cuda LtGemm: ") + kCublasLtLibrary + " has no " + name);
      }
      return p;
    };
    LtLibrary l;
    l.Create = reinterpret_cast<lt::CreateFn>(symbol("cublasLtCreate"));
    l.GetStatusString = reinterpret_cast<lt::GetStatusStringFn>(symbol("cublasLtGetStatusString"));
    l.GetVersion = reinterpret_cast<lt::GetVersionFn>(symbol("cublasLtGetVersion"));
    l.MatmulDescCreate = reinterpret_cast<lt::MatmulDescCreateFn>(symbol("cublasLtMatmulDescCreate"));
    l.MatmulDescDestroy = reinterpret_cast<lt::MatmulDescDestroyFn>(symbol("cublasLtMatmulDescDestroy"));
    l.MatmulDescSetAttribute = reinterpret_cast<lt::MatmulDescSetAttributeFn>(symbol("cublasLtMatmulDescSetAttribute"));
    l.MatrixLayoutCreate = reinterpret_cast<lt::MatrixLayoutCreateFn>(symbol("cublasLtMatrixLayoutCreate"));
    l.MatrixLayoutDestroy = reinterpret_cast<lt::MatrixLayoutDestroyFn>(symbol("cublasLtMatrixLayoutDestroy"));
    l.PreferenceCreate = reinterpret_cast<lt::PreferenceCreateFn>(symbol("cublasLtMatmulPreferenceCreate"));
    l.PreferenceDestroy = reinterpret_cast<lt::PreferenceDestroyFn>(symbol("cublasLtMatmulPreferenceDestroy"));
    l.PreferenceSetAttribute =
        reinterpret_cast<lt::PreferenceSetAttributeFn>(symbol("cublasLtMatmulPreferenceSetAttribute"));
    l.AlgoGetHeuristic = reinterpret_cast<lt::AlgoGetHeuristicFn>(symbol("cublasLtMatmulAlgoGetHeuristic"));
    l.Matmul = reinterpret_cast<lt::MatmulFn>(symbol("cublasLtMatmul"));
    return l;
  }();
  return library;
}

inline void CheckLt(lt::Status status, const char* what) {
  if (status == lt::kStatusSuccess) return;
  throw std::runtime_error(std::string("semvoc.cuda LtGemm: ") + what + ": " + LtApi().GetStatusString(status) +
                           " (status " + std::to_string(static_cast<int>(status)) + ")");
}

// A device's cuBLASLt handle and a vector of ones (the alpha vector of mode 1), made once, kept
// for the process.
struct LtDevice {
  lt::Handle handle = nullptr;
  float* ones = nullptr;
  std::string name;  // the device's name, for the keys of recorded algorithm choices
};

// A workspace of kLtWorkspaceBytes on one device, for one stream's nodes.
struct LtWorkspace {
  void* data = nullptr;
  ~LtWorkspace() {
    if (data != nullptr) cudaFree(data);  // at session teardown; errors at process exit are moot
  }
};

class LtShared {
 public:
  static LtShared& Get() {
    static LtShared* shared = new LtShared;  // never destroyed: nodes may outlive static destruction
    return *shared;
  }

  const LtDevice& Device(int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    LtDevice& d = devices_[device];
    if (d.handle == nullptr) {
      CheckLt(LtApi().Create(&d.handle), "cublasLtCreate");
      cudaDeviceProp properties;
      CheckCuda(cudaGetDeviceProperties(&properties, device), "LtGemm: cudaGetDeviceProperties");
      d.name = properties.name;
      for (char& c : d.name) c = (c == ' ' || c == '\t') ? '_' : c;
      CheckCuda(cudaMalloc(&d.ones, kLtMaxVectorRows * sizeof(float)), "LtGemm: allocating its ones vector");
      // a synchronous copy (once per device), so that this header defines no kernel of its own and
      // every op that includes it (ltgemm.cu, split_mlp.cu) shares this one device state
      const std::vector<float> ones(kLtMaxVectorRows, 1.f);
      CheckCuda(cudaMemcpy(d.ones, ones.data(), kLtMaxVectorRows * sizeof(float), cudaMemcpyHostToDevice),
                "LtGemm: filling its ones vector");
    }
    return d;
  }

  std::shared_ptr<LtWorkspace> Workspace(int device, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::weak_ptr<LtWorkspace>& slot = workspaces_[{device, stream}];
    std::shared_ptr<LtWorkspace> workspace = slot.lock();
    if (!workspace) {
      workspace = std::make_shared<LtWorkspace>();
      CheckCuda(cudaMalloc(&workspace->data, kLtWorkspaceBytes), "LtGemm: allocating its cuBLASLt workspace");
      slot = workspace;
    }
    return workspace;
  }

 private:
  std::mutex mutex_;
  std::map<int, LtDevice> devices_;
  std::map<std::pair<int, cudaStream_t>, std::weak_ptr<LtWorkspace>> workspaces_;
};

// One call's tensors. residual_scale is float32 whatever T is (cuBLASLt's beta vector is in the
// fp32 scale type).
struct LtGemmArgs {
  const void* a = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;      // [N] or null
  const void* residual = nullptr;  // [M, N] or null
  const float* scale = nullptr;    // [N] or null (only with a residual)
  void* out = nullptr;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldo = 0;        // row strides of a and out in elements (0: k and n)
  bool relu = false;               // out = max(out, 0), after every sum
  // out's address range overlaps an input's, but no element it writes is one the GEMM reads, so a
  // second call gives the same output (SplitMlp's up-projection): its candidates may be timed
  bool rerunnable = false;

  int64_t RowA() const { return lda > 0 ? lda : k; }
  int64_t RowOut() const { return ldo > 0 ? ldo : n; }
};

// How a plan computes the epilogue (level 1, 2 or 3 of the list above).
enum class LtFusion { kAll = 1, kBias = 2, kNone = 3 };

// The first level to try: $SEMVOC_LTGEMM_FUSION (1, 2 or 3), else 1.
inline LtFusion LtFirstFusion() {
  const char* value = std::getenv("SEMVOC_LTGEMM_FUSION");
  const int level = value != nullptr ? std::atoi(value) : 1;
  return level == 2 ? LtFusion::kBias : level == 3 ? LtFusion::kNone : LtFusion::kAll;
}

inline const char* LtFusionName(LtFusion f) {
  return f == LtFusion::kAll ? "all in the GEMM" : f == LtFusion::kBias ? "bias in the GEMM, residual after"
                                                                         : "GEMM, then bias and residual";
}

// out += bias[c] + residual * scale[c] (each term optional), then max(out, 0) with relu, V
// elements per thread.
template <typename T, int V>
__global__ void LtTailKernel(T* __restrict__ out, const T* __restrict__ bias, const T* __restrict__ residual,
                             const float* __restrict__ scale, int64_t vectors, int channels, bool relu) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vectors; i += int64_t(gridDim.x) * blockDim.x) {
    Vec<T, V> y = reinterpret_cast<const Vec<T, V>*>(out)[i];
    Vec<T, V> r;
    if (residual != nullptr) r = reinterpret_cast<const Vec<T, V>*>(residual)[i];
    const int c0 = static_cast<int>((i * V) % channels);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = ToFloat(y.v[j]);
      if (bias != nullptr) v += ToFloat(bias[c0 + j]);
      if (residual != nullptr) v += ToFloat(r.v[j]) * (scale != nullptr ? scale[c0 + j] : 1.f);
      y.v[j] = FromFloat<T>(relu ? fmaxf(v, 0.f) : v);
    }
    reinterpret_cast<Vec<T, V>*>(out)[i] = y;
  }
}

template <typename T>
constexpr lt::DataType LtType() {
  return sizeof(T) == 4 ? lt::kR32F : lt::kR16F;
}

inline unsigned Alignment(std::initializer_list<const void*> pointers) {
  uintptr_t bits = 256;
  for (const void* p : pointers) {
    if (p != nullptr) bits |= reinterpret_cast<uintptr_t>(p);
  }
  return static_cast<unsigned>(bits & (~bits + 1));  // the lowest set bit, at most 256
}

// Times GEMM calls as a step graph runs them: kLtTuneCalls calls captured in one CUDA graph on a
// stream of its own (no host launch cost in the figure, as in a replay), each reading its own copy
// of the weights, rotated through at least twice the L2 cache (in a step, the weights come from
// memory, the activations from L2); the fastest of kLtTuneRounds replays. The caller has
// synchronised the op's stream, so the timing stream may use the op stream's workspace.
class LtTimer {
 public:
  LtTimer(const void* weights, size_t bytes) {
    int device = 0, l2 = 0;
    CheckCuda(cudaGetDevice(&device), "LtGemm timing: cudaGetDevice");
    CheckCuda(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "LtGemm timing: L2 size");
    const size_t wanted = (2 * static_cast<size_t>(l2) + bytes - 1) / std::max<size_t>(bytes, 1);
    const int copies = static_cast<int>(std::min<size_t>(std::max<size_t>(wanted, 1), kLtTuneCalls));
    CheckCuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "LtGemm timing: cudaStreamCreate");
    CheckCuda(cudaEventCreate(&start_), "LtGemm timing: cudaEventCreate");
    CheckCuda(cudaEventCreate(&stop_), "LtGemm timing: cudaEventCreate");
    for (int c = 0; c < copies; ++c) {
      void* copy = nullptr;
      CheckCuda(cudaMalloc(&copy, bytes), "LtGemm timing: allocating a weight copy");
      copies_.push_back(copy);
      CheckCuda(cudaMemcpyAsync(copy, weights, bytes, cudaMemcpyDeviceToDevice, stream_), "LtGemm timing: copy");
    }
    CheckCuda(cudaStreamSynchronize(stream_), "LtGemm timing: copying the weights");
  }
  ~LtTimer() {
    for (void* copy : copies_) cudaFree(copy);
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  LtTimer(const LtTimer&) = delete;
  LtTimer& operator=(const LtTimer&) = delete;

  // Milliseconds for kLtTuneCalls calls of `call(stream, weights)` (an lt::Status), or -1 where a
  // call or the capture fails.
  template <typename Call>
  float Time(Call call) {
    if (call(stream_, copies_[0]) != lt::kStatusSuccess) return -1.f;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    bool ok = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    for (int c = 0; ok && c < kLtTuneCalls; ++c) {
      ok = call(stream_, copies_[c % copies_.size()]) == lt::kStatusSuccess;
    }
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    ok = ok && ended == cudaSuccess && graph != nullptr && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    float fastest = -1.f;
    for (int round = 0; ok && round <= kLtTuneRounds; ++round) {  // round 0 warms up
      ok = cudaEventRecord(start_, stream_) == cudaSuccess && cudaGraphLaunch(exec, stream_) == cudaSuccess &&
           cudaEventRecord(stop_, stream_) == cudaSuccess && cudaEventSynchronize(stop_) == cudaSuccess;
      float ms = 0.f;
      ok = ok && cudaEventElapsedTime(&ms, start_, stop_) == cudaSuccess;
      if (ok && round > 0 && (fastest < 0.f || ms < fastest)) fastest = ms;
    }
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // a refused candidate's error is not the op's
    return ok ? fastest : -1.f;
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  std::vector<void*> copies_;
};

// Everything one (M, N, K) needs at run time.
template <typename T>
class LtPlan {
 public:
  LtPlan(const LtGemmArgs& args, int device, cudaStream_t stream, unsigned alignment, bool has_bias,
         bool has_residual, bool has_scale, LtFusion first)
      : m_(args.m), n_(args.n), k_(args.k), lda_(args.RowA()), ldo_(args.RowOut()), has_bias_(has_bias),
        has_residual_(has_residual),
        has_scale_(has_scale), relu_(args.relu) {
    const LtDevice& d = LtShared::Get().Device(device);
    handle_ = d.handle;
    ones_ = d.ones;
    workspace_ = LtShared::Get().Workspace(device, stream);
    const LtLibrary& api = LtApi();
    const lt::DataType type = LtType<T>();
    CheckLt(api.MatrixLayoutCreate(&a_, type, n_, k_, n_), "cublasLtMatrixLayoutCreate (weight)");
    CheckLt(api.MatrixLayoutCreate(&b_, type, k_, m_, args.RowA()), "cublasLtMatrixLayoutCreate (input)");
    CheckLt(api.MatrixLayoutCreate(&c_, type, n_, m_, ldo_), "cublasLtMatrixLayoutCreate (output)");
    for (LtFusion f : {LtFusion::kAll, LtFusion::kBias, LtFusion::kNone}) {
      if (f != LtFusion::kAll && ldo_ != n_) continue;  // the tail kernel writes dense rows
      if (f < first && (has_bias_ || has_residual_ || relu_)) continue;  // a plain GEMM has only level 1
      if (f == LtFusion::kAll && has_scale_ && n_ > kLtMaxVectorRows) continue;
      if (f == LtFusion::kBias && (!has_residual_ || relu_)) continue;  // the same as kAll, or relu too early
      if (f == LtFusion::kNone && !has_bias_ && !has_residual_ && !relu_) continue;
      if (TryFusion(f, args, alignment)) return;
    }
    throw std::runtime_error("semvoc.cuda LtGemm: cuBLASLt has no algorithm for M=" + std::to_string(m_) +
                             " N=" + std::to_string(n_) + " K=" + std::to_string(k_) +
                             (ldo_ != n_ ? " (a strided output, SplitMlp's first GEMM)" : "") +
                             ": re-export with SEMVOC_EXPORT_WITHOUT=LtGemm,SplitMlp");
  }

  ~LtPlan() {
    const LtLibrary& api = LtApi();
    if (desc_ != nullptr) api.MatmulDescDestroy(desc_);
    for (lt::MatrixLayout l : {a_, b_, c_}) {
      if (l != nullptr) api.MatrixLayoutDestroy(l);
    }
  }
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;

  LtFusion fusion() const { return fusion_; }
  const lt::HeuristicResult& heuristic() const { return heuristic_; }
  int candidates() const { return static_cast<int>(candidates_.size()); }

  // Run the heuristic's candidate `rank` from now on (0, or a rank out of the list: its first guess).
  void Use(int rank) { heuristic_ = candidates_[rank >= 0 && rank < candidates() ? rank : 0]; }

  // What identifies this plan's candidate list: the device, cuBLASLt's version and every input of
  // the heuristic (types, shapes, row strides, epilogue, pointer mode, alignment).
  std::string Key(const std::string& device_name, unsigned alignment) const {
    return device_name + " cublasLt" + std::to_string(LtApi().GetVersion()) + (sizeof(T) == 4 ? " f32" : " f16") +
           " m" + std::to_string(m_) + " n" + std::to_string(n_) + " k" + std::to_string(k_) + " lda" +
           std::to_string(lda_) + " ldo" + std::to_string(ldo_) + " fusion" +
           std::to_string(static_cast<int>(fusion_)) +
           (has_bias_ ? " bias" : "") + (has_residual_ ? " residual" : "") + (has_scale_ ? " scale" : "") +
           (relu_ ? " relu" : "") + " align" + std::to_string(alignment);
  }

  // Times every candidate on `args` (which a second call must leave as the first did) as a step
  // graph runs it, replayed from a CUDA graph with the weights cold (LtTimer), and keeps the
  // fastest unless it beats the first guess by less than kLtTuneMargin; returns its rank. The
  // output is left as the kept candidate computes it. Synchronises `stream`: uncaptured only.
  int Tune(const LtGemmArgs& args, cudaStream_t stream) {
    CheckCuda(cudaStreamSynchronize(stream), "LtGemm: waiting for its inputs before timing");
    float first = -1.f, best = -1.f;
    int best_rank = 0;
    {
      LtTimer timer(args.w, static_cast<size_t>(k_ * n_) * sizeof(T));
      for (int r = 0; r < candidates(); ++r) {
        Use(r);
        const float ms = timer.Time([&](cudaStream_t s, const void* w) {
          LtGemmArgs call = args;
          call.w = w;
          return Run(call, s);
        });
        if (ms < 0.f) continue;  // refused at run time or in capture: not a candidate
        if (r == 0) first = ms;
        if (best < 0.f || ms < best) {
          best = ms;
          best_rank = r;
        }
      }
    }
    if (best_rank != 0 && first >= 0.f && best > first * (1.f - kLtTuneMargin)) best_rank = 0;
    Use(best_rank);
    CheckLt(Run(args, stream), "cublasLtMatmul");  // the output as the kept candidate computes it
    return best_rank;
  }

  // Enqueue one call on `stream`; returns cublasLtMatmul's status. The caller serialises calls to
  // one plan (the bias pointer is set on the shared descriptor).
  lt::Status Run(const LtGemmArgs& args, cudaStream_t stream) {
    const LtLibrary& api = LtApi();
    if (fusion_ != LtFusion::kNone && has_bias_) {
      CheckLt(api.MatmulDescSetAttribute(desc_, lt::kDescBiasPointer, &args.bias, sizeof(args.bias)),
              "setting the bias pointer");
    }
    const bool residual_in_c = fusion_ == LtFusion::kAll && has_residual_;
    const float one = 1.f, zero = 0.f;
    const void* alpha = &one;
    const void* beta = residual_in_c ? &one : &zero;
    if (residual_in_c && has_scale_) {
      alpha = ones_;
      beta = args.scale;
    }
    const lt::Status status = api.Matmul(handle_, desc_, alpha, args.w, a_, args.a, b_, beta,
                                         residual_in_c ? args.residual : args.out, c_, args.out, c_, &heuristic_.algo,
                                         workspace_->data, kLtWorkspaceBytes, stream);
    if (status != lt::kStatusSuccess || fusion_ == LtFusion::kAll) return status;
    const T* bias = fusion_ == LtFusion::kNone ? static_cast<const T*>(args.bias) : nullptr;
    const T* residual = static_cast<const T*>(args.residual);
    T* out = static_cast<T*>(args.out);
    const int64_t total = m_ * n_;
    if (Vectorizable<T>(n_, {out, residual})) {
      constexpr int V = WideVector<T>();
      LtTailKernel<T, V><<<GridFor(total / V, 256), 256, 0, stream>>>(out, bias, residual, args.scale, total / V,
                                                                       static_cast<int>(n_), relu_);
    } else {
      LtTailKernel<T, 1><<<GridFor(total, 256), 256, 0, stream>>>(out, bias, residual, args.scale, total,
                                                                  static_cast<int>(n_), relu_);
    }
    CheckCuda(cudaGetLastError(), "LtGemm epilogue kernel");
    return status;
  }

 private:
  bool TryFusion(LtFusion f, const LtGemmArgs& args, unsigned alignment) {
    const LtLibrary& api = LtApi();
    if (desc_ != nullptr) api.MatmulDescDestroy(desc_);
    desc_ = nullptr;
    CheckLt(api.MatmulDescCreate(&desc_, lt::kCompute32F, lt::kR32F), "cublasLtMatmulDescCreate");
    const bool bias_in_gemm = has_bias_ && f != LtFusion::kNone;
    const bool relu_in_gemm = relu_ && f == LtFusion::kAll;
    const uint32_t epilogue = bias_in_gemm ? (relu_in_gemm ? lt::kEpilogueReluBias : lt::kEpilogueBias)
                                           : (relu_in_gemm ? lt::kEpilogueRelu : lt::kEpilogueDefault);
    CheckLt(api.MatmulDescSetAttribute(desc_, lt::kDescEpilogue, &epilogue, sizeof(epilogue)), "epilogue");
    if (bias_in_gemm) {
      const int32_t bias_type = LtType<T>();
      CheckLt(api.MatmulDescSetAttribute(desc_, lt::kDescBiasDataType, &bias_type, sizeof(bias_type)), "bias type");
      CheckLt(api.MatmulDescSetAttribute(desc_, lt::kDescBiasPointer, &args.bias, sizeof(args.bias)), "bias pointer");
    }
    if (f == LtFusion::kAll && has_residual_ && has_scale_) {
      const int32_t mode = lt::kPointerDeviceVector;
      CheckLt(api.MatmulDescSetAttribute(desc_, lt::kDescPointerMode, &mode, sizeof(mode)), "pointer mode");
    }
    lt::Preference preference = nullptr;
    CheckLt(api.PreferenceCreate(&preference), "cublasLtMatmulPreferenceCreate");
    const uint64_t workspace = kLtWorkspaceBytes;
    int found = 0;
    lt::Status status = api.PreferenceSetAttribute(preference, lt::kPrefMaxWorkspaceBytes, &workspace,
                                                   sizeof(workspace));
    for (lt::PreferenceAttribute attribute : {lt::kPrefMinAlignmentABytes, lt::kPrefMinAlignmentBBytes,
                                              lt::kPrefMinAlignmentCBytes, lt::kPrefMinAlignmentDBytes}) {
      if (status == lt::kStatusSuccess) {
        status = api.PreferenceSetAttribute(preference, attribute, &alignment, sizeof(alignment));
      }
    }
    if (status == lt::kStatusSuccess) {
      candidates_.assign(kLtCandidates, lt::HeuristicResult{});
      status = api.AlgoGetHeuristic(handle_, desc_, a_, b_, c_, c_, preference, kLtCandidates, candidates_.data(),
                                    &found);
    }
    api.PreferenceDestroy(preference);
    if (status == lt::kStatusNotSupported || (status == lt::kStatusSuccess && found == 0)) return false;
    CheckLt(status, "cublasLtMatmulAlgoGetHeuristic");
    candidates_.resize(found);
    Use(0);
    fusion_ = f;
    return true;
  }

  int64_t m_, n_, k_, lda_, ldo_;
  bool has_bias_, has_residual_, has_scale_, relu_;
  lt::Handle handle_ = nullptr;
  const float* ones_ = nullptr;
  std::shared_ptr<LtWorkspace> workspace_;
  lt::MatmulDesc desc_ = nullptr;
  lt::MatrixLayout a_ = nullptr, b_ = nullptr, c_ = nullptr;
  lt::HeuristicResult heuristic_{};
  std::vector<lt::HeuristicResult> candidates_;  // the heuristic's list, its first guess first
  LtFusion fusion_ = LtFusion::kNone;
};

// Whether out's address range overlaps one of the inputs' (a second call could then read what
// the first wrote).
template <typename T>
bool LtOutputOverlapsInputs(const LtGemmArgs& args) {
  const auto span = [](const void* p, int64_t elements, size_t size) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
    return std::make_pair(begin, begin + static_cast<uintptr_t>(elements) * size);
  };
  const auto out = span(args.out, (args.m - 1) * args.RowOut() + args.n, sizeof(T));
  const std::pair<uintptr_t, uintptr_t> inputs[] = {
      span(args.a, (args.m - 1) * args.RowA() + args.k, sizeof(T)), span(args.w, args.k * args.n, sizeof(T)),
      span(args.bias, args.n, sizeof(T)), span(args.residual, args.m * args.n, sizeof(T)),
      span(args.scale, args.n, sizeof(float))};
  for (const auto& [begin, end] : inputs) {
    if (begin != 0 && begin < out.second && out.first < end) return true;
  }
  return false;
}

// One LtGemm node's plans, by (M, N, K, row strides, stream, alignment of its buffers).
template <typename T>
class LtGemmInstance {
 public:
  explicit LtGemmInstance(LtFusion first = LtFirstFusion()) : first_(first) {}

  // Enqueue out = a w (+ bias) (+ residual (* scale)) on `stream`; the first call of a shape plans it.
  LtPlan<T>& Run(const LtGemmArgs& args, cudaStream_t stream) {
    // the heuristic's choice assumes this alignment (of the bias and beta vector too): a call with
    // less aligned buffers gets a plan of its own
    // (row strides count as offsets: every row of a strided buffer starts at that alignment)
    const unsigned alignment = Alignment({args.a, args.w, args.bias, args.residual, args.scale, args.out,
                                          reinterpret_cast<const void*>(args.RowA() * sizeof(T)),
                                          reinterpret_cast<const void*>(args.RowOut() * sizeof(T))});
    int device = 0;
    CheckCuda(cudaGetDevice(&device), "LtGemm: cudaGetDevice");
    const Key key{args.m, args.n, args.k, args.RowA(), args.RowOut(), device, stream, alignment, args.relu};
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = plans_.find(key);
    if (found == plans_.end()) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      CheckCuda(cudaStreamIsCapturing(stream, &capture), "LtGemm: cudaStreamIsCapturing");
      Require(capture == cudaStreamCaptureStatusNone,
              "LtGemm: first call for M=" + std::to_string(args.m) + " N=" + std::to_string(args.n) + " K=" +
                  std::to_string(args.k) + " inside CUDA-graph capture, where it cannot allocate its workspace: "
                  "run the graph once without capture first (semvoc's runtime warms every graph up)");
      // The first call of a plan runs here, uncaptured: where cuBLASLt refuses the heuristic's
      // algorithm at run time (e.g. a pointer mode it offered but does not take), the next
      // epilogue level is planned instead, so that the op still computes what it documents.
      LtFusion first = first_;
      const bool tuning = LtTuningEnabled(args.m, args.n, args.k);
      for (;;) {
        auto plan = std::make_unique<LtPlan<T>>(args, device, stream, alignment, args.bias != nullptr,
                                                args.residual != nullptr, args.scale != nullptr, first);
        const bool choosing = tuning && plan->candidates() > 1;
        const std::string choice = choosing ? plan->Key(LtShared::Get().Device(device).name, alignment) : "";
        const int recorded = choosing ? LtChoices::Get().Find(choice) : 0;
        plan->Use(recorded);
        const lt::Status status = plan->Run(args, stream);
        if (status == lt::kStatusSuccess) {
          if (recorded < 0) {
            // no choice on record: time the candidates where a second call repeats the first
            int rank = 0;
            bool timed = true;
            if (args.rerunnable || !LtOutputOverlapsInputs<T>(args)) {
              std::lock_guard<std::mutex> timing(LtChoices::Get().timing());
              try {
                rank = plan->Tune(args, stream);
              } catch (const std::runtime_error&) {
                // no memory for the weight copies, say: the first guess, not recorded (a later
                // process times it again)
                cudaGetLastError();
                timed = false;
                plan->Use(0);
                CheckLt(plan->Run(args, stream), "cublasLtMatmul");
              }
            }
            if (timed) LtChoices::Get().Record(choice, rank);
          }
          return *plans_.emplace(key, std::move(plan)).first->second;
        }
        if (plan->fusion() == LtFusion::kNone || (args.bias == nullptr && args.residual == nullptr && !args.relu)) {
          CheckLt(status, "cublasLtMatmul");
        }
        first = static_cast<LtFusion>(static_cast<int>(plan->fusion()) + 1);
      }
    }
    CheckLt(found->second->Run(args, stream), "cublasLtMatmul");
    return *found->second;
  }

 private:
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, cudaStream_t, unsigned, bool>;
  LtFusion first_;
  std::mutex mutex_;
  std::map<Key, std::unique_ptr<LtPlan<T>>> plans_;
};

}  // namespace semvoc
