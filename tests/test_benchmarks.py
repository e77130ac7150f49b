"""The benchmark harness's logic on tiny inputs (benchmarks themselves never gate the suite).

CPU-only and fast: statistics, the ONNX FLOP counter on a hand-built graph, the report writer,
the ratio/floor bookkeeping, the compile time budget, and the refusal of a mismatched engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from benchmarks.flops import count_model_flops, eval_dim_param
from benchmarks.report import render_markdown, unique_base, write_results
from benchmarks.run import attach_floor, check_engine, compute_ratios, main
from benchmarks.stats import quantile, summarize
from benchmarks.systems import BenchmarkError, CompileBudgetExceeded, time_budget

onnx = pytest.importorskip("onnx")


# ------------------------------------------------------------------------------ statistics


def test_summarize_median_quartiles_and_spread():
    s = summarize([7, 1, 3, 5, 9, 2, 8, 4])  # sorted: 1 2 3 4 5 7 8 9
    assert s["n"] == 8
    assert s["median"] == pytest.approx(4.5)
    assert s["q1"] == pytest.approx(2.75)  # position 1.75: 2 + 0.75 * (3 - 2)
    assert s["q3"] == pytest.approx(7.25)  # position 5.25: 7 + 0.25 * (8 - 7)
    assert s["iqr"] == pytest.approx(4.5)
    assert (s["min"], s["max"]) == (1.0, 9.0)
    assert s["values"] == [7.0, 1.0, 3.0, 5.0, 9.0, 2.0, 8.0, 4.0]  # kept in measured order


def test_summarize_odd_and_single():
    assert summarize([3.0, 1.0, 2.0])["median"] == 2.0
    one = summarize([0.5])
    assert one["median"] == one["q1"] == one["q3"] == 0.5 and one["iqr"] == 0.0
    assert quantile([1.0, 2.0], 1.0) == 2.0
    with pytest.raises(ValueError):
        summarize([])


# ------------------------------------------------------------------------------ FLOPs


def _tiny_model():
    """One MatMul, one grouped Conv, one ConvTranspose, one Attention (opset 23), and a MatMul
    behind Shape -> Gather -> Concat -> Reshape arithmetic; ``batch`` symbolic."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT

    def weight(name, shape):
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    inputs = [
        helper.make_tensor_value_info("x", f, ["batch", 4, 8]),
        helper.make_tensor_value_info("audio", f, ["batch", 2, 10]),
        helper.make_tensor_value_info("spec", f, ["batch", 4, 5]),
        helper.make_tensor_value_info("q", f, ["batch", 2, 5, 4]),
        helper.make_tensor_value_info("k", f, ["batch", 2, 7, 4]),
        helper.make_tensor_value_info("v", f, ["batch", 2, 7, 4]),
        helper.make_tensor_value_info("flat", f, ["batch", 12]),
    ]
    inits = [weight("w_mm", [8, 16]), weight("w_conv", [6, 1, 3]), weight("w_convt", [4, 1, 6]),
             weight("w_mm2", [3, 5]), numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([4, 3], np.int64), "tail")]
    nodes = [
        helper.make_node("MatMul", ["x", "w_mm"], ["y_mm"]),
        helper.make_node("Conv", ["audio", "w_conv"], ["y_conv"], group=2, pads=[1, 1], kernel_shape=[3]),
        helper.make_node("ConvTranspose", ["spec", "w_convt"], ["y_convt"], strides=[2], kernel_shape=[6]),
        helper.make_node("Attention", ["q", "k", "v"], ["y_att"]),
        helper.make_node("Shape", ["flat"], ["flat_shape"]),
        helper.make_node("Gather", ["flat_shape", "zero"], ["b"], axis=0),
        helper.make_node("Concat", ["b", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["flat", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "w_mm2"], ["y_mm2"]),
    ]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("y_mm", "y_conv", "y_convt", "y_att", "y_mm2")]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_flop_counter_on_a_hand_built_graph():
    counted = count_model_flops(_tiny_model(), {"batch": 3})
    assert counted.unresolved == []
    # MatMul [3,4,8] @ [8,16]: 2 * (3*4*16) * 8
    assert counted.by_op["MatMul"] == 2 * 3 * 4 * 16 * 8 + 2 * 3 * 4 * 5 * 3  # + the reshaped [3,4,3] @ [3,5]
    # Conv: out [3, 6, 10], Cin/groups = 1, kernel 3: 2 * 3*6*10 * 1*3
    assert counted.by_op["Conv"] == 1080
    # ConvTranspose: every input position [3, 4, 5] through Cout/groups = 1 x kernel 6
    assert counted.by_op["ConvTranspose"] == 2 * 3 * 4 * 5 * 1 * 6
    # Attention: 4 * B * H * Lq * Lk * hd = 4 * 3 * 2 * 5 * 7 * 4
    assert counted.by_op["Attention"] == 3360
    assert counted.total == 3072 + 360 + 1080 + 720 + 3360
    assert counted.nodes == {"MatMul": 2, "Conv": 1, "ConvTranspose": 1, "Attention": 1}


def test_dim_params_of_the_exporter():
    symbols = {"batch": 4, "frames": 250, "dit_rows": 251}
    assert eval_dim_param("batch", symbols) == 4
    assert eval_dim_param("2xbatch", symbols) == 8
    assert eval_dim_param("960xframes", symbols) == 240000
    assert eval_dim_param("4xframes_p1", symbols) == 1001
    assert eval_dim_param("frames_x4_p1", symbols) == 1001
    assert eval_dim_param("frames_x16_m3", symbols) == 3997
    assert eval_dim_param("dit_rows_p1", symbols) == 252
    with pytest.raises(ValueError):
        eval_dim_param("samples16k", symbols)


def test_flop_counter_refuses_an_unknown_symbol():
    with pytest.raises(ValueError, match="batch"):
        count_model_flops(_tiny_model(), {})


# ------------------------------------------------------------------------------ report


def _row(system, batch, median, **extra):
    wall = summarize([median * 0.98, median, median * 1.03])
    stages = {k: summarize([median / 3] * 3) for k in ("text", "dit", "vocoder")}
    return {"system": system, "batch": batch, "status": "ok", "note": "", "runs": 3, "wall_s": wall,
            "stages_s": stages, "per_clip_s": median / batch, "clips_per_s": batch / median, "rtf": median / 10,
            "dit_calls": 100, "vocoder_steps": 200, "dit_step_ms": 1.0, "vocoder_step_ms": 1.0,
            "peak_mem_mib": 1234.5, "card": "Fake GPU", **extra}


def _fake_results():
    rows = [_row("torch-fp32", 1, 6.9), _row("semvoc-cuda", 1, 0.3),
            {"system": "tensorrt", "batch": 1, "status": "not installed", "note": "TensorRT is not installed"},
            {"system": "torch-compile", "batch": 1, "status": "not measured",
             "note": "did not finish compiling within 60 s (mode max-autotune)"}]
    flops = {"per_batch": {"1": {"flop_per_request": 95e12, "flop_per_clip": 95e12, "tflop_per_clip": 95.0,
                                 "unresolved": []}},
             "cross_check": {"preset": "reference", "duration_s": 10.0, "dit_step_batch2_gflop": 494.0,
                             "dit_step_batch2_gflop_design": 520.0, "vocoder_step_gflop": 168.0,
                             "vocoder_step_plus_prepare_gflop": 217.0, "vocoder_step_gflop_design": 217.0,
                             "comparable": True, "note": "a note"}}
    floor = attach_floor(rows, flops, {"tflops": 730.0, "method": "fake", "device_name": "Fake GPU"})
    return {"date": "2026-01-01", "machine": {"cpu": "Fake CPU", "cpu_count": 2, "gpu": {"name": "Fake GPU",
                                                                                         "driver": "1"},
                                              "versions": {"semvoc": "0.1.0"}},
            "workload": {"device": "cuda", "preset": "reference", "duration_s": 10.0, "steps": 100,
                         "vocoder_steps": 200},
            "rows": rows, "ratios": compute_ratios(rows, "cuda"), "floor": floor, "notes": []}


def test_floor_and_ratios_bookkeeping():
    results = _fake_results()
    rows = {r["system"]: r for r in results["rows"]}
    assert rows["semvoc-cuda"]["floor_s"] == pytest.approx(95e12 / 730e12)
    assert rows["semvoc-cuda"]["x_floor"] == pytest.approx(0.3 / (95 / 730))
    assert "x_floor" not in rows["tensorrt"]
    assert results["ratios"] == [{"batch": 1, "system": "semvoc-cuda", "baseline": "torch-fp32",
                                  "speedup": pytest.approx(6.9 / 0.3), "card": "Fake GPU"}]


def test_report_writer_markdown_and_no_overwrite(tmp_path: Path):
    results = _fake_results()
    md = render_markdown(results)
    assert "| torch-fp32 | 1 | ok | 6.9 |" in md
    assert "| semvoc-cuda | 1 | ok | 0.3 |" in md
    assert "| tensorrt | 1 | not installed |" in md and "TensorRT is not installed" in md
    assert "did not finish compiling within 60 s" in md
    assert "| 1 | semvoc-cuda | torch-fp32 | 23x |" in md
    assert "| DiT step (batch 2) | 494 | ~520 |" in md
    first = write_results(json.loads(json.dumps(results)), tmp_path, "fake-gpu-2026-01-01")
    second = write_results(json.loads(json.dumps(results)), tmp_path, "fake-gpu-2026-01-01")
    assert first["json"].name == "fake-gpu-2026-01-01.json" and first["md"].is_file()
    assert second["json"].name == "fake-gpu-2026-01-01-2.json"
    assert json.loads(first["json"].read_text())["rows"][0]["system"] == "torch-fp32"
    assert unique_base(tmp_path, "fake-gpu-2026-01-01").name == "fake-gpu-2026-01-01-3"


def _run_of(batch: int, fp32: float, semvoc: float, rate: float) -> dict:
    rows = [_row("torch-fp32", batch, fp32), _row("semvoc-cuda", batch, semvoc)]
    flops = {"per_batch": {str(batch): {"flop_per_request": 95e12 * batch, "flop_per_clip": 95e12,
                                        "tflop_per_clip": 95.0, "unresolved": []}}}
    floor = attach_floor(rows, flops, {"tflops": rate, "method": "fake", "device_name": "Fake GPU"})
    results = _fake_results()
    results["workload"].update(systems=["torch-fp32", "semvoc-cuda"], batch_sizes=[batch])
    results.update(rows=rows, ratios=compute_ratios(rows, "cuda"), floor=floor, command=f"run b{batch}",
                   files={"json": "fake-gpu-2026-01-01.json"})
    return results


def test_merge_keeps_each_runs_ratios_and_floor():
    from benchmarks.merge import merge_results

    merged = merge_results([_run_of(1, 6.9, 0.3, 730.0), _run_of(16, 40.0, 4.0, 700.0)])
    assert [(r["system"], r["batch"], r["run"]) for r in merged["rows"]] == [
        ("torch-fp32", 1, 1), ("semvoc-cuda", 1, 1), ("torch-fp32", 16, 2), ("semvoc-cuda", 16, 2)]
    assert [(r["batch"], r["speedup"]) for r in merged["ratios"]] == [(1, pytest.approx(23.0)),
                                                                      (16, pytest.approx(10.0))]
    by_batch = {r["batch"]: r for r in merged["rows"] if r["system"] == "semvoc-cuda"}
    assert by_batch[16]["x_floor"] == pytest.approx((4.0 / 16) / (95 / 700))  # its own run's matmul rate
    assert sorted(merged["floor"]["per_batch"]) == ["1", "16"] and merged["workload"]["batch_sizes"] == [1, 16]
    checks = {c["target"]: c for c in merged["targets"]["checks"]}
    assert checks["semvoc-cuda batch 1: <= 0.35 s per clip"]["met"]
    # 16 clips in 4.0 s: 4.0 clips/s, short of DESIGN.md's 4.5
    sixteen = checks["semvoc-cuda batch 16: >= 4.5 clips/s (half of the fp16 floor's throughput)"]
    assert sixteen["value"] == pytest.approx(4.0) and not sixteen["met"]
    assert checks["semvoc-cuda batch 16: peak GPU memory <= 8,000 MiB"]["met"]  # 1,234.5 MiB
    assert "730, 700 TFLOP/s" in merged["notes"][0]


def test_merge_refuses_other_cards_and_repeated_rows():
    from benchmarks.merge import MergeError, merge_results

    other = _run_of(16, 40.0, 4.0, 700.0)
    other["machine"]["gpu"]["name"] = "Other GPU"
    with pytest.raises(MergeError, match="only runs of one machine"):
        merge_results([_run_of(1, 6.9, 0.3, 730.0), other])
    with pytest.raises(MergeError, match="torch-fp32 at batch 1 is measured in more than one run"):
        merge_results([_run_of(1, 6.9, 0.3, 730.0), _run_of(1, 6.8, 0.31, 730.0)])
    changed = _run_of(16, 40.0, 4.0, 700.0)
    changed["workload"]["steps"] = 50
    with pytest.raises(MergeError, match="steps=50"):
        merge_results([_run_of(1, 6.9, 0.3, 730.0), changed])


# ------------------------------------------------------------------------------ refusals, budget


def _manifest(preset="small", seed=0):
    return {"schema_version": 1, "model": {"preset": preset, "seed": seed, "source": f"preset {preset}"},
            "graphs": {n: {"kind": n, "component": c, "file": f"{n}.onnx", "inputs": [], "outputs": []}
                       for n, c in (("text_encoder", "text"), ("dit_step", "dit"), ("vocoder_step", "vocoder"))},
            "files": {}, "defaults": {"sway": -1.0, "sample_rate": 24000},
            "buckets": {"batch_sizes": [1, 4, 16], "durations_s": [10.0], "text_tokens": 128, "max_dit_steps": 250,
                        "max_vocoder_steps": 400, "dit_rows": 251, "vocoder_rows": 401},
            "shapes": {"latent_channels": 128, "samples_per_frame": 960, "frames_per_second": 25}}


def _check(data, **kw):
    args = {"preset": "demo", "model_seed": 0, "systems": ["torch-fp32", "semvoc-cuda"], "batch_sizes": [1],
            "duration_s": 10.0, "steps": 100, "vocoder_steps": 200, **kw}
    check_engine(data, **args)


def test_refuses_an_engine_of_another_preset(tmp_path: Path, capsys):
    with pytest.raises(BenchmarkError, match=r"preset 'small' seed 0.*preset 'demo' seed 0"):
        _check(_manifest("small"))
    with pytest.raises(BenchmarkError, match="seed 3"):
        _check(_manifest("demo", seed=3))
    _check(_manifest("demo"))  # matching: accepted
    with pytest.raises(BenchmarkError, match="not exported batch buckets"):
        _check(_manifest("demo"), batch_sizes=[2])
    with pytest.raises(BenchmarkError, match="not an exported duration"):
        _check(_manifest("demo"), duration_s=5.0)
    # the command line says so and exits 2, before building any model
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest("small")))
    code = main(["--engine", str(tmp_path), "--preset", "demo", "--device", "cpu", "--systems", "torch-fp32",
                 "--out-dir", str(tmp_path / "out")])
    assert code == 2
    assert "export of preset 'small'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compile_budget_interrupts_a_long_warmup():
    start = time.perf_counter()
    with pytest.raises(CompileBudgetExceeded), time_budget(0.2):
        while time.perf_counter() - start < 5:
            pass
    assert time.perf_counter() - start < 2
    with time_budget(5):  # finishing in time leaves no alarm behind
        pass
    time.sleep(0.01)


def test_flop_counter_sees_through_the_fused_dit_form(demo_engine, tmp_path: Path):
    """The fused DiT graphs (onnxruntime contrib ops, packed-head Attention) count the same
    FLOPs as the generic ones, with every GEMM and attention resolved."""
    from benchmarks.flops import graph_flops

    from semvoc.export.cli import main as export_main
    from semvoc.runtime.manifest import load_manifest
    from tests.conftest import DEMO_EXPORT_ARGS

    generic_dir = tmp_path / "generic"
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "dit", "--dit-form", "generic",
                        "--out", str(generic_dir)]) == 0
    fused, generic = load_manifest(demo_engine, verify=False), load_manifest(generic_dir, verify=False)
    assert fused.data["dit_form"] == "fused" and generic.data["dit_form"] == "generic"
    for kind in ("dit_prepare", "dit_step"):
        ours, ref = graph_flops(fused, kind, 2, 1.0), graph_flops(generic, kind, 2, 1.0)
        assert ours.unresolved == [] and ref.unresolved == []
        assert ours.total == ref.total > 0
    step = graph_flops(fused, "dit_step", 2, 1.0)
    assert step.by_op["Attention"] == graph_flops(generic, "dit_step", 2, 1.0).by_op["Attention"] > 0


def test_recount_floor_keeps_the_rows_and_redoes_the_floor(demo_engine, tmp_path: Path, capsys):
    from benchmarks.flops import workload_flops
    from benchmarks.recount_floor import main as recount

    results = _fake_results()
    results["workload"].update(preset="demo", model_seed=0, duration_s=1.0, steps=4, vocoder_steps=4)
    results["notes"] = ["FLOP count: 3 node(s) with unresolved shapes were not counted"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    assert recount([str(path), str(demo_engine), "--reason", "a test"]) == 0
    out = json.loads((tmp_path / "run-recounted.json").read_text())
    expected = workload_flops(demo_engine, [1], 1.0, 4, 4)["per_batch"]["1"]["flop_per_request"]
    assert out["floor"]["per_batch"]["1"]["floor_s"] == pytest.approx(expected / 730e12)
    rows = {r["system"]: r for r in out["rows"]}
    assert rows["semvoc-cuda"]["wall_s"]["median"] == 0.3  # measured rows untouched
    assert rows["semvoc-cuda"]["x_floor"] == pytest.approx(0.3 / (expected / 730e12))
    assert out["floor"]["recounted"]["tflop_per_clip_before"] == {"1": 95.0}
    assert "floor recounted from " + str(demo_engine) + ": a test" in out["notes"]
    assert not any(n.startswith("FLOP count:") for n in out["notes"])  # the stale note is gone
    assert json.loads(path.read_text()) == results  # the original is never rewritten

    results["workload"]["preset"] = "reference"
    path.write_text(json.dumps(results))
    assert recount([str(path), str(demo_engine), "--reason", "x"]) == 2
    assert "not an export of preset 'reference'" in capsys.readouterr().err


def test_flop_counter_sees_through_semvocs_cuda_ops():
    """A channels-last ConvNeXt block as the --cuda-kernels graphs have it: the GEMMs after the
    custom ops keep their shapes, and ConvNeXtMix counts its depthwise conv."""
    import numpy as np
    from benchmarks.flops import count_model_flops
    from onnx import TensorProto, helper, numpy_helper

    batch, length, channels, hidden, taps = 2, 37, 16, 48, 7
    inits = [numpy_helper.from_array(np.zeros(shape, np.float32), name) for name, shape in [
        ("dw_w", (channels, 1, taps)), ("dw_b", (channels,)), ("nb", (channels,)), ("ls", (1,)),
        ("w1", (channels, hidden)), ("b1", (hidden,)), ("slope", (hidden,)), ("w2", (hidden, channels)),
        ("b2", (channels,)), ("scale", (channels,))]]
    nodes = [
        helper.make_node("ConvNeXtMix", ["x", "dw_w", "dw_b", "nb", "ls", "cond", "ts"], ["y"], domain="semvoc.cuda"),
        helper.make_node("MatMul", ["y", "w1"], ["h"]),
        helper.make_node("BiasPRelu", ["h", "b1", "slope"], ["a"], domain="semvoc.cuda"),
        helper.make_node("MatMul", ["a", "w2"], ["z"]),
        helper.make_node("BiasResidual", ["z", "b2", "x", "scale"], ["out"], domain="semvoc.cuda")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "frames", channels]),
              helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["batch", "frames", channels]),
              helper.make_tensor_value_info("ts", TensorProto.FLOAT, [1, channels])]
    graph = helper.make_graph(nodes, "block", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("semvoc.cuda", 1)])
    counted = count_model_flops(model, {"batch": batch, "frames": length})
    assert counted.unresolved == []
    assert counted.by_op["MatMul"] == 2 * (2 * batch * length * channels * hidden)
    assert counted.by_op["ConvNeXtMix"] == 2 * batch * length * channels * taps


@pytest.mark.parametrize("without", ["", "SplitMlp"], ids=["split-mlp-op", "three-lt-gemms"])
def test_flop_counter_counts_every_gemm_of_the_folded_vocoder_step(without, tmp_path, monkeypatch):
    """The --cuda-kernels vocoder step (spectral transforms folded into the projections, BiasNorm,
    tables read whole, blocks split as the export splits them, their MLPs as SplitMlp or as three
    LtGemm calls): every shape resolves and the GEMMs count what the branches compute, the
    split's extra GEMMs noted apart."""
    import onnx
    import torch
    from benchmarks.flops import count_model_flops

    from semvoc.export import wrappers as W
    from semvoc.kernels.onnx_ops import translation_table
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    monkeypatch.setenv("SEMVOC_EXPORT_WITHOUT", without)
    vocoder = build_model(preset("demo"), seed=0).vocoder.eval()
    vocoder.use_export_kernels(cuda_ops=True)
    frames, batch = 4, 1
    gen = torch.Generator().manual_seed(0)
    tables = (*W.VocoderPrepare(vocoder, channels_last=True)(torch.randn(batch, vocoder.cfg.latent_dim, frames,
                                                                         generator=gen)),
              *W.VocoderTime(vocoder)(torch.linspace(0, 1, 9)[:8]))
    samples = frames * vocoder.cfg.hop_length
    args = (torch.randn(batch, samples, generator=gen), torch.tensor([2]), torch.linspace(0, 1, 9), *tables)
    path = tmp_path / "vocoder_step.onnx"
    torch.onnx.export(W.VocoderStep(vocoder, channels_last=True).eval(), args, dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    model = onnx.load(str(path))
    # as in an engine: the recorded shapes have symbolic leading dims (dynamic batch and length),
    # so the counter's stand-ins must give every shape themselves, and a weight may be computed in
    # the graph (the engine's SplitMlp reads a Transpose of a conv weight's slice)
    for info in model.graph.value_info:
        for dim in info.type.tensor_type.shape.dim[:-1]:
            dim.dim_param = "dynamic"
    nodes = []
    for node in model.graph.node:
        if node.op_type == "SplitMlp":
            nodes.append(onnx.helper.make_node("Identity", [node.input[1]], [node.input[1] + "__computed"]))
            node.input[1] += "__computed"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    counted = count_model_flops(model, {})
    assert counted.unresolved == []
    expected = split_linear = 0
    for est in vocoder.estimators:
        n_fft, hop = est.fft.n_fft, est.fft.hop_length
        rows, channels = batch * (1 + samples // hop), est.decoder.in_proj.out_channels
        hidden = est.decoder.blocks[0].pwconv1.out_channels
        expected += 2 * (2 * rows * n_fft * channels) + len(est.decoder.blocks) * 2 * (2 * rows * channels * hidden)
        split_linear += len(est.decoder.blocks) * 2 * rows * channels * channels
    # the model's GEMMs; the PReLU split's C x C GEMMs run too, but are not the model's work
    assert counted.by_op["MatMul"] == expected
    assert f"PReLU split: {split_linear / 1e9:.3f} GFLOP" in " ".join(counted.notes)


def test_flop_counter_counts_the_dit_step_the_same_with_semvocs_cuda_ops(tmp_path):
    """HeadNormRope (q|k -> q, k), BiasGeglu (one GEMM of both GEGLU halves), CrossAttention, the
    skip path's norms and LtGemm change the graph, not the work: the DiT step counts the same FLOPs
    with and without them."""
    import onnx
    import torch
    from benchmarks.flops import count_model_flops

    from semvoc.export import wrappers as W
    from semvoc.kernels.onnx_ops import translation_table
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    dit = build_model(preset("demo"), seed=0).dit.eval()
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(1, dit.cfg.in_chans, 10, generator=gen), torch.tensor([1]),
            W.FusedDitTime(dit)(torch.tensor([900.0, 400.0])), torch.tensor([1.0, 0.5, 0.0]),
            *W.FusedDitPrepare(dit)(torch.randn(1, 6, dit.cfg.context_dim, generator=gen)),
            torch.ones(1, 6, dtype=torch.bool), torch.tensor([3.5]))
    counts = {}
    for cuda_ops in (False, True):
        path = tmp_path / f"dit_step_{cuda_ops}.onnx"
        torch.onnx.export(W.FusedDitStep(dit, cuda_ops=cuda_ops).eval(), args, dynamo=True, opset_version=23,
                          custom_translation_table=translation_table()).save(str(path))
        model = onnx.load(str(path))
        # as in an engine's graphs (symbolic dims), every shape past a semvoc op must come from the
        # counter's stand-in for it, not from shapes the exporter recorded
        del model.graph.value_info[:]
        counts[cuda_ops] = count_model_flops(model, {})
        assert counts[cuda_ops].unresolved == []
    assert counts[True].total == counts[False].total > 0
    assert counts[True].by_op.get("Attention") == counts[False].by_op.get("Attention") > 0


def test_kernel_profile_run_spans_split_runs_and_count_the_gaps():
    """Kernels of equal runs, sorted by start: each run's span and the idle time inside it."""
    from types import SimpleNamespace

    from benchmarks.device.kernel_profile import run_spans

    def kernel(start, end):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))

    # run 1: span 20 us, busy 18; run 2: span 30, busy 25; run 3: span 10, busy 10 (given out of order)
    kernels = [kernel(200, 205), kernel(100, 105), kernel(0, 10), kernel(110, 130), kernel(12, 20), kernel(205, 210)]
    span, idle = run_spans(kernels, 3)
    assert span == pytest.approx(0.020) and idle == pytest.approx(0.002)
    assert run_spans(kernels, 4) == (None, None)  # 6 kernels cannot be 4 equal runs
