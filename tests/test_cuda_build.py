"""semvoc's CUDA op library builds from pip packages alone, and its own declaration of
onnxruntime's C API (``cuda/ort_api.h``) matches the official header. No GPU needed.

The official header is ``--ort-include DIR`` (pytest option), ``$SEMVOC_ORT_INCLUDE``, or
``../shared/third_party/onnxruntime`` beside the repo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from semvoc.kernels import cuda_build

REPO = Path(__file__).resolve().parents[1]
OUR_HEADER = cuda_build.CUDA_SOURCES_DIR / "ort_api.h"
# the build CI runs: every kernel, machine code for one architecture (the default build of all six
# takes minutes on 2 cores; `python -m semvoc.kernels.cuda_build` builds all six)
CI_ARCH = "80"


@pytest.fixture(scope="module")
def official_include(request) -> Path:
    folder = (request.config.getoption("--ort-include") or os.environ.get(cuda_build.ORT_INCLUDE_ENV)
              or REPO.parent / "shared" / "third_party" / "onnxruntime")
    folder = Path(folder)
    if not (folder / "onnxruntime_c_api.h").is_file():
        pytest.skip(f"no official onnxruntime_c_api.h in {folder} (pass --ort-include DIR)")
    return folder


def _struct_body(text: str, name: str) -> str:
    start = text.index(f"struct {name} {{")
    return text[start:text.index("\n};", start)]


def _our_members() -> dict[str, list[str]]:
    text = OUR_HEADER.read_text()
    api = []
    for match in re.finditer(r"SEMVOC_ORT_(UNUSED|STATUS|RELEASE)\((\w+)|\(ORT_API_CALL\* (\w+)\)",
                             _struct_body(text, "OrtApi")):
        kind, name, plain = match.groups()
        api.append(plain if plain else f"Release{name}" if kind == "RELEASE" else name)
    custom_op = ["version", *re.findall(r"\(ORT_API_CALL\* (\w+)\)", _struct_body(text, "OrtCustomOp"))]
    enums = re.findall(r"^\s+((?:ONNX_TENSOR_ELEMENT_DATA_TYPE|ORT|OrtMemType|INPUT_OUTPUT)\w*)\s*[,=]", text,
                       flags=re.M)
    return {"OrtApi": api, "OrtCustomOp": custom_op, "OrtApiBase": ["GetApi", "GetVersionString"], "enums": enums}


def test_our_declaration_of_the_c_api_has_the_official_offsets(official_include, tmp_path):
    """Compile-time checks: every member we declare sits at the official offset, every enum
    value is the official one (a reordered or missing member fails to compile)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler (g++)")
    members = _our_members()
    assert len(members["OrtApi"]) == 194 and members["OrtApi"][-1] == "KernelContext_GetGPUComputeStream"
    assert "FLOAT16" in " ".join(members["enums"]) and len(members["OrtCustomOp"]) == 13
    checks = [f"static_assert(sizeof(ours::OrtApi) == {len(members['OrtApi'])} * sizeof(void*), \"OrtApi size\");"]
    for struct in ("OrtApi", "OrtCustomOp", "OrtApiBase"):
        checks += [f"static_assert(offsetof(ours::{struct}, {m}) == offsetof(::{struct}, {m}), \"{struct}::{m}\");"
                   for m in members[struct]]
    checks += [f"static_assert(int(ours::{e}) == int(::{e}), \"{e}\");" for e in members["enums"]]
    source = tmp_path / "offsets.cpp"
    source.write_text("#include <stddef.h>\n#include <stdint.h>\n#include <onnxruntime_c_api.h>\n"
                      "namespace ours {\n#include \"ort_api.h\"\n}\n" + "\n".join(checks) + "\n")
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-I", str(official_include),
                             "-I", str(cuda_build.CUDA_SOURCES_DIR), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_offset_check_catches_a_moved_member(official_include, tmp_path):
    """The check above can fail: with two members of our OrtApi swapped it does."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler (g++)")
    swapped = OUR_HEADER.read_text().replace("SEMVOC_ORT_UNUSED(GetErrorCode)", "@@").replace(
        "const char*(ORT_API_CALL* GetErrorMessage)(const OrtStatus* status) NO_EXCEPTION;",
        "SEMVOC_ORT_UNUSED(GetErrorCode)").replace("@@", "const char*(ORT_API_CALL* GetErrorMessage)"
                                                         "(const OrtStatus* status) NO_EXCEPTION;")
    (tmp_path / "ort_api.h").write_text(swapped)
    (tmp_path / "offsets.cpp").write_text(
        "#include <stddef.h>\n#include <stdint.h>\n#include <onnxruntime_c_api.h>\nnamespace ours {\n"
        "#include \"ort_api.h\"\n}\nstatic_assert(offsetof(ours::OrtApi, GetErrorMessage) == "
        "offsetof(::OrtApi, GetErrorMessage), \"moved\");\n")
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-I", str(official_include),
                             "-I", str(tmp_path), str(tmp_path / "offsets.cpp")], capture_output=True, text=True)
    assert result.returncode != 0 and "moved" in result.stderr


def test_nvcc_comes_from_the_pip_wheels_without_a_toolkit(monkeypatch, tmp_path):
    """With no nvcc on PATH, no CUDA_HOME and no /usr/local/cuda, the nvidia-cuda-nvcc wheel's is used."""
    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cuda_build, "DEFAULT_CUDA_ROOT", str(tmp_path / "no-cuda"))
    if not cuda_build._wheel_nvcc():
        with pytest.raises(cuda_build.KernelBuildError, match=r"semvoc\[cuda-kernels\]"):
            cuda_build.find_nvcc()
        pytest.skip("the nvidia-cuda-nvcc wheel is not installed (pip install 'semvoc[cuda-kernels]')")
    nvcc = cuda_build.find_nvcc()
    assert "site-packages" in nvcc and nvcc.endswith("/bin/nvcc")
    assert {80, 86, 89, 90, 100, 120} <= cuda_build.nvcc_archs(nvcc)


def test_an_older_nvcc_builds_the_default_list_it_can_and_refuses_explicit_ones(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: "nvcc-12.0")
    monkeypatch.setattr(cuda_build, "nvcc_archs", lambda nvcc: {75, 80, 86, 89, 90})
    monkeypatch.setattr(cuda_build, "nvcc_version", lambda nvcc: "12.0")
    commands = []

    def fake_nvcc(command, **kwargs):
        commands.append(command)
        Path(command[command.index("-o") + 1]).write_bytes(b"library")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(cuda_build.subprocess, "run", fake_nvcc)
    monkeypatch.delenv(cuda_build.ORT_INCLUDE_ENV, raising=False)
    built = cuda_build.build(tmp_path)
    assert built.archs == [80, 86, 89, 90] and built.ptx == 90
    assert "-gencode=arch=compute_90,code=compute_90" in commands[0]
    with pytest.raises(cuda_build.KernelBuildError, match=r"cannot build for compute capability 120"):
        cuda_build.build(tmp_path, arch="90,120")


def test_arch_lists_and_sources():
    assert cuda_build.parse_arch("90,8.0,80") == [80, 90] and cuda_build.parse_arch("native") is None
    with pytest.raises(cuda_build.KernelBuildError, match="compute capabilities"):
        cuda_build.parse_arch("sm_90")
    assert cuda_build._arch_flags([80, 120])[-1] == "-gencode=arch=compute_120,code=compute_120"  # PTX
    names = {p.name for p in cuda_build.sources()}
    assert {"library.cu", "convnext_mix.cu", "head_norm.cu"} <= names


def test_ops_list_names_every_registered_op():
    """The manifest's op list (cuda_build.OPS) is what library.cu registers."""
    import re

    registered = re.findall(r'MakeOp\("(\w+)"', (cuda_build.CUDA_SOURCES_DIR / "library.cu").read_text())
    assert sorted(registered) == sorted(cuda_build.OPS)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> cuda_build.BuiltLibrary:
    """The library as CI builds it: the pip wheels' nvcc (or a toolkit's), semvoc's own API header."""
    try:
        cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        if os.environ.get("CI"):
            raise  # CI installs semvoc[cuda-kernels]: a missing nvcc there is a broken setup
        pytest.skip(str(err))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(cuda_build.ORT_INCLUDE_ENV, raising=False)  # semvoc's own declaration of the API
        return cuda_build.build(tmp_path_factory.mktemp("cuda_ops"), arch=CI_ARCH)


def test_library_builds_without_onnxruntime_headers(built):
    assert built.path.is_file() and built.path.stat().st_size > 100_000
    assert not built.official_header and built.archs == [80] and built.ptx == 80
    assert built.manifest_entry()["ort_api_version"] == cuda_build.ORT_API_VERSION
    assert not list(built.path.parent.glob(".*partial*"))


def test_library_registers_its_ops_in_onnxruntime(built):
    """onnxruntime (the CPU wheel does too) accepts the op domain through our declaration of its API."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(built.path))


def test_library_refuses_an_onnxruntime_without_its_api_version(built, tmp_path):
    """An onnxruntime whose GetApi(13) is null gets an error naming the versions, not a silent no-op."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler (g++)")
    driver = tmp_path / "old_ort.cpp"
    driver.write_text(r'''
#include <dlfcn.h>
#include <cstdio>
#include <cstring>
#include "ort_api.h"
static char g_message[1024];
static OrtStatus* CreateStatus(OrtErrorCode, const char* msg) noexcept {
  std::strncpy(g_message, msg, sizeof(g_message) - 1);
  return reinterpret_cast<OrtStatus*>(g_message);
}
static OrtApi g_v1;
static const OrtApi* GetApi(uint32_t version) noexcept { return version <= 12 ? &g_v1 : nullptr; }
static const char* Version() noexcept { return "1.12.1"; }
int main(int, char** argv) {
  g_v1.CreateStatus = CreateStatus;
  OrtApiBase base{GetApi, Version};
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { std::printf("dlopen: %s\n", dlerror()); return 2; }
  using Register = OrtStatus* (*)(OrtSessionOptions*, const OrtApiBase*);
  auto reg = reinterpret_cast<Register>(dlsym(lib, "RegisterCustomOps"));
  OrtStatus* status = reg(nullptr, &base);
  std::printf("%s\n", status ? g_message : "no error");
  return status ? 0 : 1;
}
''')
    exe = tmp_path / "old_ort"
    subprocess.run([compiler, "-std=c++17", "-I", str(cuda_build.CUDA_SOURCES_DIR), str(driver), "-o", str(exe),
                    "-ldl"], check=True)
    result = subprocess.run([str(exe), str(built.path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "C API version 13" in result.stdout and "1.12.1" in result.stdout and "onnxruntime-gpu" in result.stdout


def test_library_compiles_against_the_official_header(official_include, tmp_path):
    """The sources compile against the official onnxruntime_c_api.h too (--ort-include)."""
    try:
        nvcc = cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        pytest.skip(str(err))
    from concurrent.futures import ThreadPoolExecutor

    def compile_one(source: Path) -> tuple[str, subprocess.CompletedProcess]:
        # compile only (-c, PTX only): the calls' signatures are checked against the official declarations
        return source.name, subprocess.run(
            [nvcc, "-std=c++17", "-c", "-arch=compute_80", "-DSEMVOC_OFFICIAL_ORT_HEADER", "-I", str(official_include),
             "-I", str(cuda_build.CUDA_SOURCES_DIR), str(source), "-o", str(tmp_path / f"{source.stem}.o")],
            capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for name, result in pool.map(compile_one, cuda_build.sources()):
            assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"


def test_library_declares_lt_gemm_with_optional_inputs_and_a_float32_scale(built, tmp_path):
    """onnxruntime (the CPU wheel: it checks the schema, then finds no CPU kernel) accepts LtGemm
    with its optional inputs left out or named "", and a float32 residual_scale in an fp16 graph;
    an fp16 residual_scale is a type error."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session_error(inputs: list[str], scale_type: int) -> str:
        shapes = {"a": [2, 5, 8], "w": [8, 16], "bias": [16], "res": [2, 5, 16], "scale": [16]}
        graph = helper.make_graph(
            [helper.make_node("LtGemm", inputs, ["out"], domain=cuda_build.DOMAIN)], "g",
            [helper.make_tensor_value_info(n, scale_type if n == "scale" else TensorProto.FLOAT16, shapes[n])
             for n in inputs if n],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT16, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                        helper.make_opsetid(cuda_build.DOMAIN, 1)])
        model.ir_version = 10
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(built.path))
        with pytest.raises(Exception) as error:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return str(error.value)

    for inputs in (["a", "w"], ["a", "w", "bias"], ["a", "w", "", "res"], ["a", "w", "bias", "res", "scale"]):
        assert "Failed to find kernel" in session_error(inputs, TensorProto.FLOAT), inputs
    assert "Failed to find kernel" not in session_error(["a", "w", "bias", "res", "scale"], TensorProto.FLOAT16)


def cublas_include_and_nvcc() -> tuple[Path, str]:
    """An official cublasLt.h folder and nvcc, or skip the test saying which is missing."""
    include = _cublaslt_include()
    if include is None:
        pytest.skip("no official cublasLt.h here (set CUBLAS_INCLUDE or pip install nvidia-cublas)")
    try:
        return include, cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        pytest.skip(str(err))


def _cublaslt_include() -> Path | None:
    """A folder with the official cublasLt.h: $CUBLAS_INCLUDE, else the nvidia-cublas wheel's."""
    import site

    folders = [os.environ.get("CUBLAS_INCLUDE")]
    for base in [*site.getsitepackages(), site.getusersitepackages()]:
        folders += [f"{base}/nvidia/cu13/include", f"{base}/nvidia/cublas/include"]
    return next((Path(f) for f in folders if f and (Path(f) / "cublasLt.h").is_file()), None)


LT_CHECKS = r'''
#include <cublasLt.h>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>
#include "cublaslt_api.h"
namespace lt = semvoc::lt;
template <typename F> struct Sig;
template <typename R, typename... A> struct Sig<R (*)(A...)> {
  static constexpr std::size_t n = sizeof...(A);
  using Args = std::tuple<A...>;
  using Ret = R;
};
// same arity, and every argument and the result of the same size and pointer-ness
template <typename O, typename T, std::size_t... I>
constexpr bool SameAbi(std::index_sequence<I...>) {
  using OA = typename Sig<O>::Args;
  using TA = typename Sig<T>::Args;
  return ((sizeof(std::tuple_element_t<I, OA>) == sizeof(std::tuple_element_t<I, TA>) &&
           std::is_pointer_v<std::tuple_element_t<I, OA>> == std::is_pointer_v<std::tuple_element_t<I, TA>>) && ...) &&
         sizeof(typename Sig<O>::Ret) == sizeof(typename Sig<T>::Ret);
}
#define SAME(OURS, THEIRS) \
  static_assert(Sig<lt::OURS>::n == Sig<decltype(&THEIRS)>::n && \
                SameAbi<lt::OURS, decltype(&THEIRS)>(std::make_index_sequence<Sig<lt::OURS>::n>{}), #THEIRS);
SAME(CreateFn, cublasLtCreate)
SAME(GetStatusStringFn, cublasLtGetStatusString)
SAME(GetVersionFn, cublasLtGetVersion)
SAME(MatmulDescCreateFn, cublasLtMatmulDescCreate)
SAME(MatmulDescDestroyFn, cublasLtMatmulDescDestroy)
SAME(MatmulDescSetAttributeFn, cublasLtMatmulDescSetAttribute)
SAME(MatrixLayoutCreateFn, cublasLtMatrixLayoutCreate)
SAME(MatrixLayoutDestroyFn, cublasLtMatrixLayoutDestroy)
SAME(PreferenceCreateFn, cublasLtMatmulPreferenceCreate)
SAME(PreferenceDestroyFn, cublasLtMatmulPreferenceDestroy)
SAME(PreferenceSetAttributeFn, cublasLtMatmulPreferenceSetAttribute)
SAME(AlgoGetHeuristicFn, cublasLtMatmulAlgoGetHeuristic)
SAME(MatmulFn, cublasLtMatmul)
#define VALUE(OURS, THEIRS) static_assert(int(lt::OURS) == int(THEIRS), #THEIRS);
VALUE(kStatusSuccess, CUBLAS_STATUS_SUCCESS)
VALUE(kStatusNotSupported, CUBLAS_STATUS_NOT_SUPPORTED)
VALUE(kCompute32F, CUBLAS_COMPUTE_32F)
VALUE(kR32F, CUDA_R_32F)
VALUE(kR16F, CUDA_R_16F)
VALUE(kEpilogueDefault, CUBLASLT_EPILOGUE_DEFAULT)
VALUE(kEpilogueBias, CUBLASLT_EPILOGUE_BIAS)
VALUE(kEpilogueRelu, CUBLASLT_EPILOGUE_RELU)
VALUE(kEpilogueReluBias, CUBLASLT_EPILOGUE_RELU_BIAS)
VALUE(kPointerHost, CUBLASLT_POINTER_MODE_HOST)
VALUE(kPointerDeviceVector, CUBLASLT_POINTER_MODE_DEVICE_VECTOR)
VALUE(kDescPointerMode, CUBLASLT_MATMUL_DESC_POINTER_MODE)
VALUE(kDescEpilogue, CUBLASLT_MATMUL_DESC_EPILOGUE)
VALUE(kDescBiasPointer, CUBLASLT_MATMUL_DESC_BIAS_POINTER)
VALUE(kDescBiasDataType, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE)
VALUE(kPrefMaxWorkspaceBytes, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES)
VALUE(kPrefMinAlignmentABytes, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES)
VALUE(kPrefMinAlignmentBBytes, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES)
VALUE(kPrefMinAlignmentCBytes, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES)
VALUE(kPrefMinAlignmentDBytes, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES)
static_assert(sizeof(lt::MatmulAlgo) == sizeof(cublasLtMatmulAlgo_t), "algo");
static_assert(sizeof(lt::HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t), "heuristic result");
#define FIELD(NAME) \
  static_assert(offsetof(lt::HeuristicResult, NAME) == offsetof(cublasLtMatmulHeuristicResult_t, NAME), #NAME);
FIELD(algo)
FIELD(workspaceSize)
FIELD(state)
FIELD(wavesCount)
static_assert(sizeof(lt::Status) == sizeof(cublasStatus_t) && sizeof(lt::DataType) == sizeof(cudaDataType_t), "enums");
'''


@pytest.mark.parametrize("mutation", [None, ("kEpilogueBias = 4", "kEpilogueBias = 5")], ids=["ours", "a-wrong-value"])
def test_our_declaration_of_cublaslt_matches_the_official_header(mutation, tmp_path):
    """cuda/cublaslt_api.h (what LtGemm resolves with dlsym) against cublasLt.h, where one is on the
    machine: values, struct layouts, and each entry point's arity and argument sizes. A changed
    value fails the check."""
    include, nvcc = cublas_include_and_nvcc()
    ours = (cuda_build.CUDA_SOURCES_DIR / "cublaslt_api.h").read_text()
    if mutation:
        assert mutation[0] in ours
        ours = ours.replace(*mutation)
    (tmp_path / "cublaslt_api.h").write_text(ours)
    (tmp_path / "check.cu").write_text(LT_CHECKS)
    result = subprocess.run([nvcc, "-std=c++17", "-x", "cu", "-c", "-I", str(tmp_path), "-I", str(include),
                             str(tmp_path / "check.cu"), "-o", str(tmp_path / "check.o")], capture_output=True,
                            text=True)
    if mutation is None:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode != 0 and "CUBLASLT_EPILOGUE_BIAS" in result.stderr
