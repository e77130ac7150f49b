"""Fused operators as PyTorch custom ops that export to ONE chosen ONNX node.

Each fused op is declared once with ``fused_op``: a PyTorch reference implementation (what
eager PyTorch runs, and what the tests compare against) and an ONNX translation (what
``torch.onnx.export`` emits for it, given ``custom_translation_table=translation_table()``).
Ops of onnxruntime's ``com.microsoft`` domain have no schema in the ``onnx`` package, so
``contrib_op`` registers one (inputs, outputs, attributes, as onnxruntime documents them)
before the exporter builds a node of it. semvoc's own CUDA ops (``semvoc.cuda`` domain, built by
``semvoc.kernels.cuda_build``) are declared the same way with ``domain=CUDA_DOMAIN``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx
from onnx.defs import OpSchema

MS_DOMAIN = "com.microsoft"
CUDA_DOMAIN = "semvoc.cuda"
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_TRANSLATIONS: dict = {}
WITHOUT_ENV = "SEMVOC_EXPORT_WITHOUT"
# float32 in every engine (type U): norm statistics, cuBLASLt's beta vector, the vocoder's ODE state
_FLOAT32_PARAMS = {"mean", "inv_std_var", "residual_scale", "audio", "t_span", "audio_next"}
_INT64_PARAMS = {"step"}  # type I


def _names(env: str) -> set[str]:
    return {n.strip() for n in os.environ.get(env, "").split(",") if n.strip()}


def fusion_enabled(name: str) -> bool:
    """Whether the export may use the fusion ``name`` (a semvoc.cuda op's name, e.g. "BiasNorm",
    or a rewrite's, e.g. "PReLUSplit").

    ``SEMVOC_EXPORT_WITHOUT=Name[,Name]`` leaves those fusions out of an export (the graph then
    keeps the unfused form), so that an A/B on a GPU compares two exports that differ in one op
    (``benchmarks/device/export_slice.py``)."""
    return name not in _names(WITHOUT_ENV)


def contrib_op(name: str, inputs: list[str], outputs: list[str], attributes: dict[str, OpSchema.AttrType],
               domain: str = MS_DOMAIN):
    """An onnxscript ``Op`` of onnxruntime's contrib domain (or ``domain``); ``name?`` marks an
    optional parameter; every tensor is of type T (float types), except those of ``_FLOAT32_PARAMS``
    (U, float32), ``step`` (I, int64) and ``key_mask`` (B, bool)."""
    from onnxscript.values import Op, Opset

    if not onnx.defs.has(name, domain):
        param = OpSchema.FormalParameter
        optional = OpSchema.FormalParameterOption.Optional

        def params(names):
            out = []
            for n in names:
                base = n.rstrip("?")
                kind = ("U" if base in _FLOAT32_PARAMS else "I" if base in _INT64_PARAMS
                        else "B" if base == "key_mask" else "T")
                out.append(param(base, kind, param_option=optional) if n.endswith("?") else param(base, kind))
            return out

        schema = OpSchema(name, domain, 1, inputs=params(inputs), outputs=params(outputs),
                          type_constraints=[("T", _FLOAT_TYPES, ""), ("U", ["tensor(float)"], ""),
                                            ("B", ["tensor(bool)"], ""), ("I", ["tensor(int64)"], "")],
                          attributes=[OpSchema.Attribute(a, kind, "") for a, kind in attributes.items()])
        onnx.defs.register_schema(schema)
    return Op(Opset(domain, 1), name)


def register_translation(torch_op, onnx_fn: Callable) -> None:
    _TRANSLATIONS[torch_op] = onnx_fn


def translation_table() -> dict:
    """Every fused op's ONNX translation (import the kernel modules first: they register)."""
    from semvoc.kernels import (  # noqa: F401
        attention,
        audio_frames,
        bias_geglu,
        bias_gelu,
        bias_norm,
        bias_prelu,
        bias_residual,
        convnext_mix,
        cross_attention,
        euler_overlap_add,
        gated_skip_norm,
        head_norm,
        ltgemm,
        rotary,
        skip_layernorm,
        skip_norm,
        split_mlp,
    )

    return dict(_TRANSLATIONS)
