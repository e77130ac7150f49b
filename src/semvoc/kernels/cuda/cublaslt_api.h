// The part of cuBLASLt (cublasLt.h, CUDA 13) that LtGemm calls, declared here so that the op
// library builds without cuBLAS headers or libraries: the entry points are resolved at run time
// from libcublasLt.so.13 (ltgemm_kernel.cuh), which onnxruntime-gpu's CUDA provider has loaded.
// Every value and signature below is the official header's; tests/test_cuda_build.py compares them
// with a cublasLt.h when one is on the machine ($CUBLAS_INCLUDE or the nvidia-cublas wheel).
// Enums are declared with their official values (C enums: passed as int); handles and
// descriptors are opaque pointers.
#pragma once

#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

namespace semvoc {
namespace lt {

enum Status { kStatusSuccess = 0, kStatusNotSupported = 15 };   // cublasStatus_t
enum ComputeType { kCompute32F = 68 };                          // cublasComputeType_t: CUBLAS_COMPUTE_32F
enum DataType { kR32F = 0, kR16F = 2 };                         // cudaDataType_t: CUDA_R_32F, CUDA_R_16F
enum Epilogue {  // cublasLtEpilogue_t
  kEpilogueDefault = 1,
  kEpilogueRelu = 2,
  kEpilogueBias = 4,
  kEpilogueReluBias = 6,
};
enum PointerMode { kPointerHost = 0, kPointerDeviceVector = 2 };  // cublasLtPointerMode_t
enum MatmulDescAttribute {                                      // cublasLtMatmulDescAttributes_t
  kDescPointerMode = 2,    // CUBLASLT_MATMUL_DESC_POINTER_MODE (int32_t)
  kDescEpilogue = 7,       // CUBLASLT_MATMUL_DESC_EPILOGUE (uint32_t)
  kDescBiasPointer = 8,    // CUBLASLT_MATMUL_DESC_BIAS_POINTER (const void*)
  kDescBiasDataType = 26,  // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE (int32_t)
};
enum PreferenceAttribute {             // cublasLtMatmulPreferenceAttributes_t
  kPrefMaxWorkspaceBytes = 1,          // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES (uint64_t)
  kPrefMinAlignmentABytes = 5,         // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES (uint32_t)
  kPrefMinAlignmentBBytes = 6,
  kPrefMinAlignmentCBytes = 7,
  kPrefMinAlignmentDBytes = 8,
};

struct Context;  // cublasLtHandle_t is struct cublasLtContext*
using Handle = Context*;
using MatmulDesc = void*;      // cublasLtMatmulDesc_t
using MatrixLayout = void*;    // cublasLtMatrixLayout_t
using Preference = void*;      // cublasLtMatmulPreference_t

struct MatmulAlgo {  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};

struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
  MatmulAlgo algo;
  size_t workspaceSize;
  Status state;
  float wavesCount;
  int reserved[4];
};

// The entry points, as function-pointer types (the official prototypes).
using CreateFn = Status (*)(Handle*);
using GetStatusStringFn = const char* (*)(Status);
using GetVersionFn = size_t (*)();
using MatmulDescCreateFn = Status (*)(MatmulDesc*, ComputeType, DataType);
using MatmulDescDestroyFn = Status (*)(MatmulDesc);
using MatmulDescSetAttributeFn = Status (*)(MatmulDesc, MatmulDescAttribute, const void*, size_t);
using MatrixLayoutCreateFn = Status (*)(MatrixLayout*, DataType, uint64_t, uint64_t, int64_t);
using MatrixLayoutDestroyFn = Status (*)(MatrixLayout);
using PreferenceCreateFn = Status (*)(Preference*);
using PreferenceDestroyFn = Status (*)(Preference);
using PreferenceSetAttributeFn = Status (*)(Preference, PreferenceAttribute, const void*, size_t);
using AlgoGetHeuristicFn = Status (*)(Handle, MatmulDesc, MatrixLayout, MatrixLayout, MatrixLayout, MatrixLayout,
                                      Preference, int, HeuristicResult*, int*);
using MatmulFn = Status (*)(Handle, MatmulDesc, const void*, const void*, MatrixLayout, const void*, MatrixLayout,
                            const void*, const void*, MatrixLayout, void*, MatrixLayout, const MatmulAlgo*, void*,
                            size_t, cudaStream_t);

}  // namespace lt
}  // namespace semvoc
