// The part of onnxruntime's C API (onnxruntime_c_api.h) that semvoc's CUDA ops use, declared here
// so that the library builds from pip packages alone (the onnxruntime wheels ship no C header).
//
// The C API is versioned and append-only: OrtApi for version N holds the members of every version
// up to N at fixed offsets. This file declares OrtApi up to the last member we call
// (KernelContext_GetGPUComputeStream, API 13), in the official member order; members we do not
// call are opaque function pointers of the same size. OrtCustomOp stops at GetInputMemoryType:
// onnxruntime reads only the fields of the version an op declares (library.cu sets 13).
// tests/test_cuda_build.py checks every offset and enum value against an official header;
// building with --ort-include (or SEMVOC_ORT_INCLUDE) uses the official header instead.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifndef ORT_API_CALL
#define ORT_API_CALL
#endif
#ifndef ORT_EXPORT
#define ORT_EXPORT __attribute__((visibility("default")))
#endif
#ifndef NO_EXCEPTION
#define NO_EXCEPTION noexcept
#endif

// Function-pointer members, spelled as the official macros expand them on Linux.
#define SEMVOC_ORT_STATUS(NAME, ...) OrtStatus*(ORT_API_CALL* NAME)(__VA_ARGS__) NO_EXCEPTION
#define SEMVOC_ORT_RELEASE(X) void(ORT_API_CALL* Release##X)(Ort##X* input)
#define SEMVOC_ORT_UNUSED(NAME) void (*NAME)(void);

#define SEMVOC_ORT_OPAQUE(X) struct X; typedef struct X X;
SEMVOC_ORT_OPAQUE(OrtStatus)
SEMVOC_ORT_OPAQUE(OrtValue)
SEMVOC_ORT_OPAQUE(OrtTensorTypeAndShapeInfo)
SEMVOC_ORT_OPAQUE(OrtSessionOptions)
SEMVOC_ORT_OPAQUE(OrtCustomOpDomain)
SEMVOC_ORT_OPAQUE(OrtKernelInfo)
SEMVOC_ORT_OPAQUE(OrtKernelContext)
#undef SEMVOC_ORT_OPAQUE
typedef OrtStatus* OrtStatusPtr;

typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX64,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX128,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
  ORT_OK,
  ORT_FAIL,
  ORT_INVALID_ARGUMENT,
} OrtErrorCode;

typedef enum OrtMemType {
  OrtMemTypeCPUInput = -2,
  OrtMemTypeCPUOutput = -1,
  OrtMemTypeCPU = OrtMemTypeCPUOutput,
  OrtMemTypeDefault = 0,
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL,
  INPUT_OUTPUT_VARIADIC,
} OrtCustomOpInputOutputCharacteristic;

struct OrtCustomOp;
typedef struct OrtCustomOp OrtCustomOp;

// Members 0..193 of the official struct (the number after each line is the first member's index).
struct OrtApi {
  OrtStatus*(ORT_API_CALL* CreateStatus)(OrtErrorCode code, const char* msg) NO_EXCEPTION;  // 0
  SEMVOC_ORT_UNUSED(GetErrorCode)  // 1
  const char*(ORT_API_CALL* GetErrorMessage)(const OrtStatus* status) NO_EXCEPTION;  // 2
  SEMVOC_ORT_UNUSED(CreateEnv) SEMVOC_ORT_UNUSED(CreateEnvWithCustomLogger)  // 3
  SEMVOC_ORT_UNUSED(EnableTelemetryEvents) SEMVOC_ORT_UNUSED(DisableTelemetryEvents)  // 5
  SEMVOC_ORT_UNUSED(CreateSession)  // 7
  SEMVOC_ORT_UNUSED(CreateSessionFromArray) SEMVOC_ORT_UNUSED(Run) SEMVOC_ORT_UNUSED(CreateSessionOptions)  // 8
  SEMVOC_ORT_UNUSED(SetOptimizedModelFilePath) SEMVOC_ORT_UNUSED(CloneSessionOptions)  // 11
  SEMVOC_ORT_UNUSED(SetSessionExecutionMode) SEMVOC_ORT_UNUSED(EnableProfiling)  // 13
  SEMVOC_ORT_UNUSED(DisableProfiling) SEMVOC_ORT_UNUSED(EnableMemPattern) SEMVOC_ORT_UNUSED(DisableMemPattern)  // 15
  SEMVOC_ORT_UNUSED(EnableCpuMemArena) SEMVOC_ORT_UNUSED(DisableCpuMemArena) SEMVOC_ORT_UNUSED(SetSessionLogId)  // 18
  SEMVOC_ORT_UNUSED(SetSessionLogVerbosityLevel) SEMVOC_ORT_UNUSED(SetSessionLogSeverityLevel)  // 21
  SEMVOC_ORT_UNUSED(SetSessionGraphOptimizationLevel) SEMVOC_ORT_UNUSED(SetIntraOpNumThreads)  // 23
  SEMVOC_ORT_UNUSED(SetInterOpNumThreads)  // 25
  SEMVOC_ORT_STATUS(CreateCustomOpDomain, const char* domain, OrtCustomOpDomain** out);  // 26
  SEMVOC_ORT_STATUS(CustomOpDomain_Add, OrtCustomOpDomain* custom_op_domain, const OrtCustomOp* op);  // 27
  SEMVOC_ORT_STATUS(AddCustomOpDomain, OrtSessionOptions* options, OrtCustomOpDomain* custom_op_domain);  // 28
  SEMVOC_ORT_UNUSED(RegisterCustomOpsLibrary) SEMVOC_ORT_UNUSED(SessionGetInputCount)  // 29
  SEMVOC_ORT_UNUSED(SessionGetOutputCount) SEMVOC_ORT_UNUSED(SessionGetOverridableInitializerCount)  // 31
  SEMVOC_ORT_UNUSED(SessionGetInputTypeInfo)  // 33
  SEMVOC_ORT_UNUSED(SessionGetOutputTypeInfo) SEMVOC_ORT_UNUSED(SessionGetOverridableInitializerTypeInfo)  // 34
  SEMVOC_ORT_UNUSED(SessionGetInputName) SEMVOC_ORT_UNUSED(SessionGetOutputName)  // 36
  SEMVOC_ORT_UNUSED(SessionGetOverridableInitializerName)  // 38
  SEMVOC_ORT_UNUSED(CreateRunOptions) SEMVOC_ORT_UNUSED(RunOptionsSetRunLogVerbosityLevel)  // 39
  SEMVOC_ORT_UNUSED(RunOptionsSetRunLogSeverityLevel) SEMVOC_ORT_UNUSED(RunOptionsSetRunTag)  // 41
  SEMVOC_ORT_UNUSED(RunOptionsGetRunLogVerbosityLevel)  // 43
  SEMVOC_ORT_UNUSED(RunOptionsGetRunLogSeverityLevel) SEMVOC_ORT_UNUSED(RunOptionsGetRunTag)  // 44
  SEMVOC_ORT_UNUSED(RunOptionsSetTerminate) SEMVOC_ORT_UNUSED(RunOptionsUnsetTerminate)  // 46
  SEMVOC_ORT_UNUSED(CreateTensorAsOrtValue)  // 48
  SEMVOC_ORT_UNUSED(CreateTensorWithDataAsOrtValue) SEMVOC_ORT_UNUSED(IsTensor)  // 49
  SEMVOC_ORT_STATUS(GetTensorMutableData, OrtValue* value, void** out);  // 51
  SEMVOC_ORT_UNUSED(FillStringTensor) SEMVOC_ORT_UNUSED(GetStringTensorDataLength)  // 52
  SEMVOC_ORT_UNUSED(GetStringTensorContent) SEMVOC_ORT_UNUSED(CastTypeInfoToTensorInfo)  // 54
  SEMVOC_ORT_UNUSED(GetOnnxTypeFromTypeInfo)  // 56
  SEMVOC_ORT_UNUSED(CreateTensorTypeAndShapeInfo) SEMVOC_ORT_UNUSED(SetTensorElementType)  // 57
  SEMVOC_ORT_UNUSED(SetDimensions)  // 59
  SEMVOC_ORT_STATUS(GetTensorElementType, const OrtTensorTypeAndShapeInfo* info,
                    enum ONNXTensorElementDataType* out);  // 60
  SEMVOC_ORT_STATUS(GetDimensionsCount, const OrtTensorTypeAndShapeInfo* info, size_t* out);  // 61
  SEMVOC_ORT_STATUS(GetDimensions, const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values,
                    size_t dim_values_length);  // 62
  SEMVOC_ORT_UNUSED(GetSymbolicDimensions) SEMVOC_ORT_UNUSED(GetTensorShapeElementCount)  // 63
  SEMVOC_ORT_STATUS(GetTensorTypeAndShape, const OrtValue* value, OrtTensorTypeAndShapeInfo** out);  // 65
  SEMVOC_ORT_UNUSED(GetTypeInfo) SEMVOC_ORT_UNUSED(GetValueType) SEMVOC_ORT_UNUSED(CreateMemoryInfo)  // 66
  SEMVOC_ORT_UNUSED(CreateCpuMemoryInfo) SEMVOC_ORT_UNUSED(CompareMemoryInfo)  // 69
  SEMVOC_ORT_UNUSED(MemoryInfoGetName) SEMVOC_ORT_UNUSED(MemoryInfoGetId)  // 71
  SEMVOC_ORT_UNUSED(MemoryInfoGetMemType) SEMVOC_ORT_UNUSED(MemoryInfoGetType)  // 73
  SEMVOC_ORT_UNUSED(AllocatorAlloc)  // 75
  SEMVOC_ORT_UNUSED(AllocatorFree) SEMVOC_ORT_UNUSED(AllocatorGetInfo)  // 76
  SEMVOC_ORT_UNUSED(GetAllocatorWithDefaultOptions) SEMVOC_ORT_UNUSED(AddFreeDimensionOverride)  // 78
  SEMVOC_ORT_UNUSED(GetValue)  // 80
  SEMVOC_ORT_UNUSED(GetValueCount) SEMVOC_ORT_UNUSED(CreateValue) SEMVOC_ORT_UNUSED(CreateOpaqueValue)  // 81
  SEMVOC_ORT_UNUSED(GetOpaqueValue)  // 84
  SEMVOC_ORT_STATUS(KernelInfoGetAttribute_float, const OrtKernelInfo* info, const char* name, float* out);  // 85
  SEMVOC_ORT_STATUS(KernelInfoGetAttribute_int64, const OrtKernelInfo* info, const char* name, int64_t* out);  // 86
  SEMVOC_ORT_UNUSED(KernelInfoGetAttribute_string)  // 87
  SEMVOC_ORT_UNUSED(KernelContext_GetInputCount) SEMVOC_ORT_UNUSED(KernelContext_GetOutputCount)  // 88
  SEMVOC_ORT_STATUS(KernelContext_GetInput, const OrtKernelContext* context, size_t index, const OrtValue** out);  // 90
  SEMVOC_ORT_STATUS(KernelContext_GetOutput, OrtKernelContext* context, size_t index, const int64_t* dim_values,
                    size_t dim_count, OrtValue** out);  // 91
  SEMVOC_ORT_UNUSED(ReleaseEnv)  // 92
  SEMVOC_ORT_RELEASE(Status);  // 93
  SEMVOC_ORT_UNUSED(ReleaseMemoryInfo) SEMVOC_ORT_UNUSED(ReleaseSession) SEMVOC_ORT_UNUSED(ReleaseValue)  // 94
  SEMVOC_ORT_UNUSED(ReleaseRunOptions) SEMVOC_ORT_UNUSED(ReleaseTypeInfo)  // 97
  SEMVOC_ORT_RELEASE(TensorTypeAndShapeInfo);  // 99
  SEMVOC_ORT_UNUSED(ReleaseSessionOptions) SEMVOC_ORT_UNUSED(ReleaseCustomOpDomain)  // 100
  SEMVOC_ORT_UNUSED(GetDenotationFromTypeInfo) SEMVOC_ORT_UNUSED(CastTypeInfoToMapTypeInfo)  // 102
  SEMVOC_ORT_UNUSED(CastTypeInfoToSequenceTypeInfo)  // 104
  SEMVOC_ORT_UNUSED(GetMapKeyType) SEMVOC_ORT_UNUSED(GetMapValueType)  // 105
  SEMVOC_ORT_UNUSED(GetSequenceElementType) SEMVOC_ORT_UNUSED(ReleaseMapTypeInfo)  // 107
  SEMVOC_ORT_UNUSED(ReleaseSequenceTypeInfo)  // 109
  SEMVOC_ORT_UNUSED(SessionEndProfiling) SEMVOC_ORT_UNUSED(SessionGetModelMetadata)  // 110
  SEMVOC_ORT_UNUSED(ModelMetadataGetProducerName) SEMVOC_ORT_UNUSED(ModelMetadataGetGraphName)  // 112
  SEMVOC_ORT_UNUSED(ModelMetadataGetDomain)  // 114
  SEMVOC_ORT_UNUSED(ModelMetadataGetDescription) SEMVOC_ORT_UNUSED(ModelMetadataLookupCustomMetadataMap)  // 115
  SEMVOC_ORT_UNUSED(ModelMetadataGetVersion) SEMVOC_ORT_UNUSED(ReleaseModelMetadata)  // 117
  SEMVOC_ORT_UNUSED(CreateEnvWithGlobalThreadPools)  // 119
  SEMVOC_ORT_UNUSED(DisablePerSessionThreads) SEMVOC_ORT_UNUSED(CreateThreadingOptions)  // 120
  SEMVOC_ORT_UNUSED(ReleaseThreadingOptions) SEMVOC_ORT_UNUSED(ModelMetadataGetCustomMetadataMapKeys)  // 122
  SEMVOC_ORT_UNUSED(AddFreeDimensionOverrideByName)  // 124
  SEMVOC_ORT_UNUSED(GetAvailableProviders) SEMVOC_ORT_UNUSED(ReleaseAvailableProviders)  // 125
  SEMVOC_ORT_UNUSED(GetStringTensorElementLength) SEMVOC_ORT_UNUSED(GetStringTensorElement)  // 127
  SEMVOC_ORT_UNUSED(FillStringTensorElement)  // 129
  SEMVOC_ORT_UNUSED(AddSessionConfigEntry) SEMVOC_ORT_UNUSED(CreateAllocator)  // 130
  SEMVOC_ORT_UNUSED(ReleaseAllocator) SEMVOC_ORT_UNUSED(RunWithBinding) SEMVOC_ORT_UNUSED(CreateIoBinding)  // 132
  SEMVOC_ORT_UNUSED(ReleaseIoBinding) SEMVOC_ORT_UNUSED(BindInput) SEMVOC_ORT_UNUSED(BindOutput)  // 135
  SEMVOC_ORT_UNUSED(BindOutputToDevice) SEMVOC_ORT_UNUSED(GetBoundOutputNames)  // 138
  SEMVOC_ORT_UNUSED(GetBoundOutputValues) SEMVOC_ORT_UNUSED(ClearBoundInputs)  // 140
  SEMVOC_ORT_UNUSED(ClearBoundOutputs) SEMVOC_ORT_UNUSED(TensorAt)  // 142
  SEMVOC_ORT_UNUSED(CreateAndRegisterAllocator)  // 144
  SEMVOC_ORT_UNUSED(SetLanguageProjection) SEMVOC_ORT_UNUSED(SessionGetProfilingStartTimeNs)  // 145
  SEMVOC_ORT_UNUSED(SetGlobalIntraOpNumThreads) SEMVOC_ORT_UNUSED(SetGlobalInterOpNumThreads)  // 147
  SEMVOC_ORT_UNUSED(SetGlobalSpinControl)  // 149
  SEMVOC_ORT_UNUSED(AddInitializer) SEMVOC_ORT_UNUSED(CreateEnvWithCustomLoggerAndGlobalThreadPools)  // 150
  SEMVOC_ORT_UNUSED(SessionOptionsAppendExecutionProvider_CUDA)  // 152
  SEMVOC_ORT_UNUSED(SessionOptionsAppendExecutionProvider_ROCM)  // 153
  SEMVOC_ORT_UNUSED(SessionOptionsAppendExecutionProvider_OpenVINO)  // 154
  SEMVOC_ORT_UNUSED(SetGlobalDenormalAsZero) SEMVOC_ORT_UNUSED(CreateArenaCfg)  // 155
  SEMVOC_ORT_UNUSED(ReleaseArenaCfg) SEMVOC_ORT_UNUSED(ModelMetadataGetGraphDescription)  // 157
  SEMVOC_ORT_UNUSED(SessionOptionsAppendExecutionProvider_TensorRT)  // 159
  SEMVOC_ORT_UNUSED(SetCurrentGpuDeviceId) SEMVOC_ORT_UNUSED(GetCurrentGpuDeviceId)  // 160
  SEMVOC_ORT_UNUSED(KernelInfoGetAttributeArray_float) SEMVOC_ORT_UNUSED(KernelInfoGetAttributeArray_int64)  // 162
  SEMVOC_ORT_UNUSED(CreateArenaCfgV2)  // 164
  SEMVOC_ORT_UNUSED(AddRunConfigEntry) SEMVOC_ORT_UNUSED(CreatePrepackedWeightsContainer)  // 165
  SEMVOC_ORT_UNUSED(ReleasePrepackedWeightsContainer)  // 167
  SEMVOC_ORT_UNUSED(CreateSessionWithPrepackedWeightsContainer)  // 168
  SEMVOC_ORT_UNUSED(CreateSessionFromArrayWithPrepackedWeightsContainer)  // 169
  SEMVOC_ORT_UNUSED(SessionOptionsAppendExecutionProvider_TensorRT_V2)  // 170
  SEMVOC_ORT_UNUSED(CreateTensorRTProviderOptions) SEMVOC_ORT_UNUSED(UpdateTensorRTProviderOptions)  // 171
  SEMVOC_ORT_UNUSED(GetTensorRTProviderOptionsAsString) SEMVOC_ORT_UNUSED(ReleaseTensorRTProviderOptions)  // 173
  SEMVOC_ORT_UNUSED(EnableOrtCustomOps) SEMVOC_ORT_UNUSED(RegisterAllocator)  // 175
  SEMVOC_ORT_UNUSED(UnregisterAllocator) SEMVOC_ORT_UNUSED(IsSparseTensor)  // 177
  SEMVOC_ORT_UNUSED(CreateSparseTensorAsOrtValue)  // 179
  SEMVOC_ORT_UNUSED(FillSparseTensorCoo) SEMVOC_ORT_UNUSED(FillSparseTensorCsr)  // 180
  SEMVOC_ORT_UNUSED(FillSparseTensorBlockSparse) SEMVOC_ORT_UNUSED(CreateSparseTensorWithValuesAsOrtValue)  // 182
  SEMVOC_ORT_UNUSED(UseCooIndices)  // 184
  SEMVOC_ORT_UNUSED(UseCsrIndices) SEMVOC_ORT_UNUSED(UseBlockSparseIndices)  // 185
  SEMVOC_ORT_UNUSED(GetSparseTensorFormat) SEMVOC_ORT_UNUSED(GetSparseTensorValuesTypeAndShape)  // 187
  SEMVOC_ORT_UNUSED(GetSparseTensorValues)  // 189
  SEMVOC_ORT_UNUSED(GetSparseTensorIndicesTypeShape) SEMVOC_ORT_UNUSED(GetSparseTensorIndices)  // 190
  SEMVOC_ORT_UNUSED(HasValue)  // 192
  SEMVOC_ORT_STATUS(KernelContext_GetGPUComputeStream, const OrtKernelContext* context, void** out);  // 193
};
typedef struct OrtApi OrtApi;

struct OrtApiBase {
  const OrtApi*(ORT_API_CALL* GetApi)(uint32_t version) NO_EXCEPTION;  // null when the version is not offered
  const char*(ORT_API_CALL* GetVersionString)(void) NO_EXCEPTION;
};
typedef struct OrtApiBase OrtApiBase;

// The fields of an op of version <= 14 up to GetInputMemoryType (version 13 reads no further).
struct OrtCustomOp {
  uint32_t version;
  void*(ORT_API_CALL* CreateKernel)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char*(ORT_API_CALL* GetName)(const struct OrtCustomOp* op);
  const char*(ORT_API_CALL* GetExecutionProviderType)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetInputType)(const struct OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetInputTypeCount)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetOutputType)(const struct OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetOutputTypeCount)(const struct OrtCustomOp* op);
  void(ORT_API_CALL* KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void(ORT_API_CALL* KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetInputCharacteristic)(const struct OrtCustomOp* op,
                                                                             size_t index);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetOutputCharacteristic)(const struct OrtCustomOp* op,
                                                                              size_t index);
  OrtMemType(ORT_API_CALL* GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
};

#undef SEMVOC_ORT_STATUS
#undef SEMVOC_ORT_RELEASE
#undef SEMVOC_ORT_UNUSED
