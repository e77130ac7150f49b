"""Which fused operators onnxruntime's CUDA EP runs, and what each costs against its unfused
decomposition, at the reference DiT's shapes (batch 2 = CFG, 250 frames, 16 heads x 64).

    python -m benchmarks.device.op_probe [--copies 40]

Each probe graph holds ``copies`` independent instances of one pattern reading the same
inputs; it is replayed from a CUDA graph, so the time per instance is GPU time, not launch cost.
A probe that fails to build or falls back to the CPU is reported as unsupported. (A first run
of this script, before common-subexpression elimination was disabled, timed merged copies.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

B, L, H, HD = 2, 250, 16, 64
D = H * HD
F16 = TensorProto.FLOAT16


def _model(inputs, nodes_fn, copies, opset=23, extra_init=()):
    nodes, outputs = [], []
    for i in range(copies):
        out_nodes, out_name, out_shape = nodes_fn(i)
        nodes += out_nodes
        outputs.append(helper.make_tensor_value_info(out_name, F16, out_shape))
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializer=list(extra_init))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, F16, shape)


def _init(name, array):
    return onnx.numpy_helper.from_array(array.astype(np.float16), name)


def probes(copies: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    cos = rng.standard_normal((L, HD // 2)).astype(np.float16)
    sin = rng.standard_normal((L, HD // 2)).astype(np.float16)
    cos_full = np.concatenate([cos, cos], -1)[None, :, None, :]
    sin_full = np.concatenate([sin, sin], -1)[None, :, None, :]

    # RoPE: ONNX RotaryEmbedding (3-D input [B, L, H*hd], heads split inside) vs Split/Neg/Concat/Mul/Mul/Add
    def rope_fused(i):
        return ([helper.make_node("RotaryEmbedding", ["xr", "cos", "sin", "pos"], [f"y{i}"], interleaved=0,
                                  num_heads=H)], f"y{i}", [B, L, D])

    def rope_plain(i):
        return ([helper.make_node("Split", ["x", "half"], [f"a{i}", f"b{i}"], axis=-1),
                 helper.make_node("Neg", [f"b{i}"], [f"nb{i}"]),
                 helper.make_node("Concat", [f"nb{i}", f"a{i}"], [f"r{i}"], axis=-1),
                 helper.make_node("Mul", ["x", "cosf"], [f"m{i}"]),
                 helper.make_node("Mul", [f"r{i}", "sinf"], [f"n{i}"]),
                 helper.make_node("Add", [f"m{i}", f"n{i}"], [f"y{i}"])], f"y{i}", [B, L, H, HD])

    pos = onnx.numpy_helper.from_array(np.tile(np.arange(L, dtype=np.int64), (B, 1)), "pos")
    out["rope_onnx"] = (_model([_vi("xr", [B, L, D])], rope_fused, copies,
                               extra_init=[_init("cos", cos), _init("sin", sin), pos]),
                        {"xr": [B, L, D]})
    out["rope_plain"] = (_model([_vi("x", [B, L, H, HD])], rope_plain, copies,
                                extra_init=[_init("cosf", cos_full), _init("sinf", sin_full),
                                            onnx.numpy_helper.from_array(np.array([HD // 2] * 2, np.int64), "half")]),
                         {"x": [B, L, H, HD]})

    # Attention: 3-D inputs (heads split inside) vs 4-D with the exporter's transposes
    def attn3(i):
        return ([helper.make_node("Attention", ["q3", "k3", "v3"], [f"y{i}"], q_num_heads=H, kv_num_heads=H)],
                f"y{i}", [B, L, D])

    def attn4(i):
        return ([helper.make_node("Transpose", ["q4"], [f"qt{i}"], perm=[0, 2, 1, 3]),
                 helper.make_node("Transpose", ["k4"], [f"kt{i}"], perm=[0, 2, 1, 3]),
                 helper.make_node("Transpose", ["v4"], [f"vt{i}"], perm=[0, 2, 1, 3]),
                 helper.make_node("Attention", [f"qt{i}", f"kt{i}", f"vt{i}"], [f"o{i}"]),
                 helper.make_node("Transpose", [f"o{i}"], [f"y{i}"], perm=[0, 2, 1, 3])], f"y{i}", [B, L, H, HD])

    def attn4_only(i):
        return ([helper.make_node("Attention", ["q4", "k4", "v4"], [f"y{i}"])], f"y{i}", [B, L, H, HD])

    qkv3 = [_vi(n, [B, L, D]) for n in ("q3", "k3", "v3")]
    qkv4 = [_vi(n, [B, L, H, HD]) for n in ("q4", "k4", "v4")]
    out["attention_3d"] = (_model(qkv3, attn3, copies), {n: [B, L, D] for n in ("q3", "k3", "v3")})
    out["attention_4d_transposes"] = (_model(qkv4, attn4, copies), {n: [B, L, H, HD] for n in ("q4", "k4", "v4")})
    out["attention_4d_only"] = (_model(qkv4, attn4_only, copies), {n: [B, L, H, HD] for n in ("q4", "k4", "v4")})

    # residual add + LayerNorm: SkipLayerNormalization vs Add + LayerNormalization
    gamma, beta = _init("g", rng.standard_normal(D)), _init("b", rng.standard_normal(D))

    def skipln(i):
        return ([helper.make_node("SkipLayerNormalization", ["x3", "s3", "g", "b"], [f"y{i}", "", "", f"sum{i}"],
                                  domain="com.microsoft", epsilon=1e-5)], f"y{i}", [B, L, D])

    def addln(i):
        return ([helper.make_node("Add", ["x3", "s3"], [f"sum{i}"]),
                 helper.make_node("LayerNormalization", [f"sum{i}", "g", "b"], [f"y{i}"], axis=-1, epsilon=1e-5)],
                f"y{i}", [B, L, D])

    xs = [_vi("x3", [B, L, D]), _vi("s3", [B, L, D])]
    out["skip_layernorm"] = (_model(xs, skipln, copies, extra_init=[gamma, beta]), {"x3": [B, L, D], "s3": [B, L, D]})
    out["add_layernorm"] = (_model(xs, addln, copies, extra_init=[gamma, beta]), {"x3": [B, L, D], "s3": [B, L, D]})

    # GEGLU: BiasSplitGelu vs Add/Split/Gelu/Mul
    inner = 4 * D * 2
    bias = _init("bias", rng.standard_normal(inner) * 0.1)

    def bsg(i):
        return ([helper.make_node("BiasSplitGelu", ["h", "bias"], [f"y{i}"], domain="com.microsoft")],
                f"y{i}", [B, L, inner // 2])

    def geglu(i):
        return ([helper.make_node("Add", ["h", "bias"], [f"hb{i}"]),
                 helper.make_node("Split", [f"hb{i}", "halves"], [f"a{i}", f"g{i}"], axis=-1),
                 helper.make_node("Gelu", [f"g{i}"], [f"gg{i}"]),
                 helper.make_node("Mul", [f"a{i}", f"gg{i}"], [f"y{i}"])], f"y{i}", [B, L, inner // 2])

    halves = onnx.numpy_helper.from_array(np.array([inner // 2] * 2, np.int64), "halves")
    out["bias_split_gelu"] = (_model([_vi("h", [B, L, inner])], bsg, copies, extra_init=[bias]), {"h": [B, L, inner]})
    out["geglu_plain"] = (_model([_vi("h", [B, L, inner])], geglu, copies, extra_init=[bias, halves]),
                          {"h": [B, L, inner]})

    # LayerNorm over 64 (qk-norm) in two layouts, and one elementwise Mul for scale
    gq, bq = _init("gq", rng.standard_normal(HD)), _init("bq", rng.standard_normal(HD))

    def ln_head(i):
        return ([helper.make_node("LayerNormalization", ["x4", "gq", "bq"], [f"y{i}"], axis=-1, epsilon=1e-5)],
                f"y{i}", [B, L, H, HD])

    def mul(i):
        return ([helper.make_node("Mul", ["x3", "s3"], [f"y{i}"])], f"y{i}", [B, L, D])

    out["layernorm_hd64"] = (_model([_vi("x4", [B, L, H, HD])], ln_head, copies, extra_init=[gq, bq]),
                             {"x4": [B, L, H, HD]})
    # the joint q|k LayerNorm over head_dim (64): LayerNormalization vs SkipLayerNormalization
    # with a zero 2-D skip (onnxruntime has a vectorised kernel for the latter)
    def ln_qk(i):
        return ([helper.make_node("LayerNormalization", ["xqk", "gq", "bq"], [f"y{i}"], axis=-1, epsilon=1e-5)],
                f"y{i}", [B * L, 2 * H, HD])

    def skipln_qk(i):
        return ([helper.make_node("SkipLayerNormalization", ["xqk", "zero", "gq", "bq"], [f"y{i}"],
                                  domain="com.microsoft", epsilon=1e-5)], f"y{i}", [B * L, 2 * H, HD])

    zero = _init("zero", np.zeros((2 * H, HD)))
    out["layernorm_qk_hd64"] = (_model([_vi("xqk", [B * L, 2 * H, HD])], ln_qk, copies, extra_init=[gq, bq]),
                                {"xqk": [B * L, 2 * H, HD]})
    out["skiplayernorm_qk_hd64"] = (_model([_vi("xqk", [B * L, 2 * H, HD])], skipln_qk, copies,
                                           extra_init=[gq, bq, zero]), {"xqk": [B * L, 2 * H, HD]})
    out["mul_BxLxD"] = (_model(xs, mul, copies), {"x3": [B, L, D], "s3": [B, L, D]})
    return out


def run_probe(model, shapes, copies, iters=30):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.log_severity_level = 3
    path = "/tmp/probe.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(1)
    feeds = {k: (rng.standard_normal(s) * 0.5).astype(np.float16) for k, s in shapes.items()}
    # the copies are identical: without this, common-subexpression elimination merges them
    session = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})],
                                   disabled_optimizers=["CommonSubexpressionElimination"])
    cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    keep = []
    for k, v in feeds.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
        binding.bind_ortvalue_input(k, keep[-1])
    for o in session.get_outputs():
        shape = [d for d in o.shape]
        keep.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float16, "cuda", 0))
        binding.bind_ortvalue_output(o.name, keep[-1])
    for _ in range(3):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    gpu_out = keep[len(feeds)].numpy().astype(np.float32)
    err = None
    try:
        ref = cpu.run([session.get_outputs()[0].name], feeds)[0].astype(np.float32)
        err = float(np.abs(gpu_out - ref).max() / (np.abs(ref).max() + 1e-6))
    except Exception as e:  # CPU EP may lack the contrib op
        err = f"cpu: {str(e)[:80]}"
    return {"us_per_instance": statistics.median(times) / copies * 1e6, "rel_err_vs_cpu": err}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    import onnxruntime as ort

    ort.preload_dlls()
    results = {}
    for name, (model, shapes) in probes(args.copies).items():
        try:
            results[name] = run_probe(model, shapes, args.copies)
        except Exception as e:
            results[name] = {"unsupported": str(e)[:300]}
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
