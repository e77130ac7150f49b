// The library onnxruntime loads (SessionOptions.register_custom_ops_library): registers the
// semvoc.cuda domain, one float32 and one float16 kernel per op, on the CUDA execution provider.
#include "ort_op.h"

namespace semvoc {

void ConvNeXtMixCompute(OrtKernelContext* ctx, const KernelState&);
void BiasPReluCompute(OrtKernelContext* ctx, const KernelState&);
void BiasResidualCompute(OrtKernelContext* ctx, const KernelState&);
void HeadNormCompute(OrtKernelContext* ctx, const KernelState&);
void HeadNormRopeCompute(OrtKernelContext* ctx, const KernelState&);
void HeadNormRopeQkvCompute(OrtKernelContext* ctx, const KernelState&);
void GatedSkipNormCompute(OrtKernelContext* ctx, const KernelState&);
void BiasGegluCompute(OrtKernelContext* ctx, const KernelState&);
void BiasNormCompute(OrtKernelContext* ctx, const KernelState&);
void GatedConcatNormCompute(OrtKernelContext* ctx, const KernelState&);
void BiasAddNormCompute(OrtKernelContext* ctx, const KernelState&);
void LayerNormCompute(OrtKernelContext* ctx, const KernelState&);
void CrossAttentionCompute(OrtKernelContext* ctx, const KernelState&);
void QkvAttentionCompute(OrtKernelContext* ctx, const KernelState&);
void AudioFramesCompute(OrtKernelContext* ctx, const KernelState&);
void EulerOverlapAddCompute(OrtKernelContext* ctx, const KernelState&);
void LtGemmCompute(OrtKernelContext* ctx, const KernelState&);
void* LtGemmCreate();
void LtGemmDestroy(void* state);
void SplitMlpCompute(OrtKernelContext* ctx, const KernelState&);
void* SplitMlpCreate();
void SplitMlpDestroy(void* state);

// A node's kernel: its op and the attributes it was created with.
struct Kernel {
  const OpDef* op;
  KernelState state;
};

static const OrtApi* g_api = nullptr;
const OrtApi* Api() { return g_api; }

// An attribute the node may leave out, read with `get` (the OrtApi getter of its type): `fallback`
// when it does.
template <typename V, typename Getter>
static V OptionalAttribute(const OrtApi* api, Getter get, const OrtKernelInfo* info, const char* name, V fallback) {
  V value = fallback;
  if (OrtStatus* status = get(info, name, &value)) {
    api->ReleaseStatus(status);
    value = fallback;
  }
  return value;
}

static void* CreateKernel(const OrtCustomOp* custom_op, const OrtApi* api, const OrtKernelInfo* info) {
  const OpDef* op = static_cast<const OpDef*>(custom_op);
  Kernel* kernel = new Kernel{op, {}};
  if (op->create != nullptr) kernel->state.data = op->create();
  if (op->epsilon) Check(api->KernelInfoGetAttribute_float(info, "epsilon", &kernel->state.epsilon), "attribute epsilon");
  const auto get_float = api->KernelInfoGetAttribute_float;
  const auto get_int = api->KernelInfoGetAttribute_int64;
  if (op->optional_epsilon) kernel->state.epsilon = OptionalAttribute(api, get_float, info, "epsilon", 0.f);
  // a node without `layer` reads layer 0
  if (op->layer) kernel->state.layer = OptionalAttribute(api, get_int, info, "layer", int64_t{0});
  if (op->relu) kernel->state.relu = OptionalAttribute(api, get_int, info, "relu", int64_t{0}) != 0;
  if (op->lead) kernel->state.lead = OptionalAttribute(api, get_int, info, "lead", int64_t{0});
  if (op->hop) Check(api->KernelInfoGetAttribute_int64(info, "hop", &kernel->state.hop), "attribute hop");
  if (op->pred_x1) {
    int64_t pred_x1 = 0;
    Check(api->KernelInfoGetAttribute_int64(info, "pred_x1", &pred_x1), "attribute pred_x1");
    kernel->state.pred_x1 = pred_x1 != 0;
  }
  if (op->num_heads) Check(api->KernelInfoGetAttribute_int64(info, "num_heads", &kernel->state.num_heads),
                           "attribute num_heads");
  return kernel;
}
static const char* GetName(const OrtCustomOp* op) { return static_cast<const OpDef*>(op)->name; }
static const char* GetProvider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }
static ONNXTensorElementDataType GetInputType(const OrtCustomOp* custom_op, size_t index) {
  const OpDef* op = static_cast<const OpDef*>(custom_op);
  if (static_cast<int>(index) == op->bool_input) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  if (index < 32 && (op->int64_inputs >> index) & 1u) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  return index < 32 && (op->float32_inputs >> index) & 1u ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : op->type;
}
static ONNXTensorElementDataType GetOutputType(const OrtCustomOp* custom_op, size_t index) {
  const OpDef* op = static_cast<const OpDef*>(custom_op);
  return index < 32 && (op->float32_outputs >> index) & 1u ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : op->type;
}
static size_t GetInputCount(const OrtCustomOp* op) { return static_cast<const OpDef*>(op)->inputs; }
static size_t GetOutputCount(const OrtCustomOp* op) { return static_cast<const OpDef*>(op)->outputs; }
static void Compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel* k = static_cast<const Kernel*>(kernel);
  k->op->compute(ctx, k->state);
}
static void Destroy(void* kernel) {
  Kernel* k = static_cast<Kernel*>(kernel);
  if (k->op->destroy != nullptr) k->op->destroy(k->state.data);
  delete k;
}
static OrtCustomOpInputOutputCharacteristic InputCharacteristic(const OrtCustomOp* custom_op, size_t index) {
  const OpDef* op = static_cast<const OpDef*>(custom_op);
  return op->required != 0 && index >= op->required ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic Required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
static OrtMemType DeviceMemory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }

OpDef MakeOp(const char* name, ONNXTensorElementDataType type, size_t inputs, size_t outputs, ComputeFn compute,
             bool epsilon, bool layer, bool num_heads, int bool_input) {
  OpDef op;
  std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));  // newer headers: later fields unset
  op.version = kOrtApiVersion;  // onnxruntime reads only the fields of this version
  op.CreateKernel = CreateKernel;
  op.GetName = GetName;
  op.GetExecutionProviderType = GetProvider;
  op.GetInputType = GetInputType;
  op.GetInputTypeCount = GetInputCount;
  op.GetOutputType = GetOutputType;
  op.GetOutputTypeCount = GetOutputCount;
  op.KernelCompute = Compute;
  op.KernelDestroy = Destroy;
  op.GetInputCharacteristic = InputCharacteristic;
  op.GetOutputCharacteristic = Required;
  op.GetInputMemoryType = DeviceMemory;
  op.name = name;
  op.type = type;
  op.inputs = inputs;
  op.outputs = outputs;
  op.epsilon = epsilon;
  op.layer = layer;
  op.num_heads = num_heads;
  op.bool_input = bool_input;
  op.compute = compute;
  return op;
}

static std::vector<OpDef>& Ops() {
  static std::vector<OpDef> ops = [] {
    std::vector<OpDef> all;
    for (auto type : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16}) {
      OpDef mix = MakeOp("ConvNeXtMix", type, 7, 1, ConvNeXtMixCompute, /*epsilon=*/false, /*layer=*/true);
      mix.lead = true;
      all.push_back(mix);
      all.push_back(MakeOp("BiasPRelu", type, 3, 1, BiasPReluCompute));
      all.push_back(MakeOp("BiasResidual", type, 4, 1, BiasResidualCompute));
      all.push_back(MakeOp("HeadNorm", type, 3, 1, HeadNormCompute, /*epsilon=*/true));
      all.push_back(MakeOp("HeadNormRope", type, 5, 2, HeadNormRopeCompute, /*epsilon=*/true));
      all.push_back(MakeOp("HeadNormRopeQkv", type, 5, 3, HeadNormRopeQkvCompute, /*epsilon=*/true));
      all.push_back(MakeOp("GatedSkipNorm", type, 6, 2, GatedSkipNormCompute, /*epsilon=*/true));
      all.push_back(MakeOp("BiasGeglu", type, 2, 1, BiasGegluCompute));
      all.push_back(MakeOp("BiasNorm", type, 4, 1, BiasNormCompute));
      all.push_back(MakeOp("GatedConcatNorm", type, 7, 1, GatedConcatNormCompute, /*epsilon=*/true));
      all.push_back(MakeOp("BiasAddNorm", type, 4, 2, BiasAddNormCompute, /*epsilon=*/true));
      all.push_back(MakeOp("LayerNorm", type, 3, 1, LayerNormCompute, /*epsilon=*/true));
      // q, k, v, key_mask, q_gamma?, q_beta? (the query's LayerNorm, with the attribute epsilon)
      OpDef cross = MakeOp("CrossAttention", type, 6, 1, CrossAttentionCompute, /*epsilon=*/false, /*layer=*/false,
                           /*num_heads=*/true, /*bool_input=*/3);
      cross.required = 4;
      cross.optional_epsilon = true;
      all.push_back(cross);
      OpDef lt_gemm = MakeOp("LtGemm", type, 5, 1, LtGemmCompute);  // a, w, bias?, residual?, residual_scale?
      lt_gemm.required = 2;
      lt_gemm.relu = true;
      lt_gemm.float32_inputs = 1u << 4;  // residual_scale: cuBLASLt's beta vector is fp32
      lt_gemm.create = LtGemmCreate;
      lt_gemm.destroy = LtGemmDestroy;
      all.push_back(lt_gemm);
      OpDef split_mlp = MakeOp("SplitMlp", type, 6, 1, SplitMlpCompute);  // wide, w1, b1, w2, bias, residual
      split_mlp.create = SplitMlpCreate;
      split_mlp.destroy = SplitMlpDestroy;
      all.push_back(split_mlp);
      OpDef frames = MakeOp("AudioFrames", type, 1, 1, AudioFramesCompute);  // x -> frames
      frames.hop = true;
      all.push_back(frames);
      // audio, step, t_span, pieces_0, pieces_1..3? -> audio_next
      OpDef euler = MakeOp("EulerOverlapAdd", type, 7, 1, EulerOverlapAddCompute);
      euler.required = 4;
      euler.float32_inputs = 1u | 1u << 2;
      euler.int64_inputs = 1u << 1;
      euler.float32_outputs = 1u;
      euler.pred_x1 = true;
      all.push_back(euler);
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {  // qkv, gamma, beta, cos, sin (a kernel for fp16 only)
        all.push_back(MakeOp("QkvAttention", type, 5, 1, QkvAttentionCompute, /*epsilon=*/true, /*layer=*/false,
                             /*num_heads=*/true));
      }
    }
    return all;
  }();
  return ops;
}

}  // namespace semvoc

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  using namespace semvoc;
  g_api = base->GetApi(kOrtApiVersion);
  if (g_api == nullptr) {  // an onnxruntime older than the API we call: refuse, through API 1's CreateStatus
    const OrtApi* v1 = base->GetApi(1);
    std::string message = std::string("semvoc.cuda: libsemvoc_cuda.so needs onnxruntime's C API version ") +
                          std::to_string(kOrtApiVersion) + " (onnxruntime >= 1." + std::to_string(kOrtApiVersion) +
                          "), which this onnxruntime " + base->GetVersionString() +
                          " does not offer: pip install -U onnxruntime-gpu";
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  OrtCustomOpDomain* domain = nullptr;  // owned by the sessions' lifetime: never released (tiny)
  if (OrtStatus* status = g_api->CreateCustomOpDomain(kDomain, &domain)) return status;
  for (OpDef& op : Ops()) {
    if (OrtStatus* status = g_api->CustomOpDomain_Add(domain, &op)) return status;
  }
  return g_api->AddCustomOpDomain(options, domain);
}
