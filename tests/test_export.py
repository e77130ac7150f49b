"""semvoc-export: engine contents, graph structure, parity, precision, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from semvoc.export.cli import main as export_main
from semvoc.export.onnx_export import host_copying_nodes, op_counts
from semvoc.runtime.manifest import SCHEMA_VERSION, load_manifest, sha256_file
from tests.conftest import DEMO_EXPORT_ARGS

GRAPHS = {"text_encoder", "dit_prepare", "dit_time", "dit_step", "vocoder_prepare", "vocoder_time",
          "vocoder_step", "semantic_encoder_1s"}


def test_engine_dir_contract(demo_engine):
    manifest = load_manifest(demo_engine)  # verifies every sha256
    data = manifest.data
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(manifest.graphs) == GRAPHS
    assert data["model"]["untrained"] is True and "UNTRAINED" in data["model"]["source"]
    assert data["opset"] == 23
    assert data["defaults"] == {"steps": 100, "vocoder_steps": 200, "guidance": 3.5, "sway": -1.0,
                                "noise_scale": 0.1, "sample_rate": 24000, "clamp": True, "pred_x1": True}
    assert data["buckets"]["batch_sizes"] == [1, 2] and data["buckets"]["durations_s"] == [1.0]
    for producer in ("semvoc", "torch", "onnx", "onnxruntime", "transformers"):
        assert data["producer"][producer]
    on_disk = {p.name for p in demo_engine.iterdir()}
    assert set(data["files"]) | {"manifest.json"} == on_disk
    for rel, digest in data["files"].items():
        assert sha256_file(demo_engine / rel) == digest
    parity = json.loads((demo_engine / "parity.json").read_text())
    assert parity["all_passed"] and set(parity["graphs"]) == GRAPHS
    assert all(g["max_rel_error"] < 1e-3 for g in parity["graphs"].values())
    assert parity["graphs"]["dit_step"]["steps"] == 3  # step graphs are checked over consecutive steps


def test_attention_is_fused_in_the_attention_graphs(demo_engine):
    dit = op_counts(demo_engine / "dit_step.onnx")
    assert dit["Softmax"] == 0 and dit["Attention"] == 2 * 5  # self + cross, 5 blocks (depth 4)
    semantic = op_counts(demo_engine / "semantic_encoder_1s.onnx")
    assert semantic["Softmax"] == 0 and semantic["Attention"] == 2  # Dasheng depth 2
    vocoder = op_counts(demo_engine / "vocoder_step.onnx")
    # STFT/iSTFT lowered to framed GEMMs (n_fft is a multiple of hop in every branch)
    assert vocoder["MatMul"] >= 2 * 3 and vocoder["ConvTranspose"] == 0
    assert not {"STFT", "DFT"} & set(vocoder)


def test_text_to_audio_graphs_before_the_vocoder_step_hold_no_convolution(demo_engine):
    """A convolution makes onnxruntime call cuDNN, whose first run in a process costs about a
    second on the GPU: the DiT step and vocoder_prepare hold GEMMs instead (conv_as_gemm)."""
    for name in ("text_encoder", "dit_prepare", "dit_time", "dit_step", "vocoder_prepare", "vocoder_time"):
        counts = op_counts(demo_engine / f"{name}.onnx")
        assert counts["Conv"] == 0 and counts["ConvTranspose"] == 0, name


def test_step_graphs_copy_nothing_from_the_host_per_run(demo_engine):
    for name in ("dit_step", "vocoder_step"):
        assert host_copying_nodes(demo_engine / f"{name}.onnx") == [], name
    splits = [n for n in onnx.load(str(demo_engine / "dit_step.onnx"), load_external_data=False).graph.node
              if n.op_type == "Split"]
    assert len(splits) >= 2  # the time table's rows: two levels of Splits (a check that sees them)


def test_symbolic_dims_are_named_for_onnxruntime_overrides(demo_engine):
    manifest = load_manifest(demo_engine)
    step = manifest.graphs["vocoder_step"]
    dims = {t.name: t.onnx_dims for t in step.inputs}
    assert dims["audio"] == ["batch", "frames_x960"]
    assert dims["cond_bias_0"][-1] == "frames_x4_p1"
    assert manifest.graphs["dit_step"].input("cross_k_0").onnx_dims[0] == "batch_x2"
    for tensor in step.inputs:
        for dim in tensor.onnx_dims:
            assert isinstance(dim, int) or dim.isidentifier()


@pytest.mark.parametrize("limit", ["EXTERNAL_DATA_THRESHOLD", "SEPARATE_WEIGHTS_BYTES"])
def test_external_data_for_large_graphs(tmp_path, monkeypatch, limit):
    """Past protobuf's limit the exporter writes the weights outside; past 64 MiB semvoc moves them
    out (onnxruntime loads them faster from there). Both limits lowered so the demo model passes."""
    import semvoc.export.onnx_export as ox

    monkeypatch.setattr(ox, limit, 1000)  # force weights out of the .onnx
    out = tmp_path / "ext"
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out)]) == 0
    manifest = load_manifest(out)
    entry = manifest.graphs["text_encoder"]
    assert entry.data_file == "text_encoder.onnx.data" and (out / entry.data_file).stat().st_size > 1e5
    model = onnx.load(str(out / entry.file), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert entry.data_file in manifest.data["files"]


def test_fp16_export_is_valid_and_records_its_precision(tmp_path):
    out = tmp_path / "fp16"
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text,dit", "--fp16", "--out", str(out)]) == 0
    manifest = load_manifest(out)
    precision = manifest.data["precision"]
    assert precision["dtype"] == "float16"
    assert set(precision["calibration_max_abs"]) >= {"text", "dit"}  # measured, not assumed
    assert all(np.isfinite(v) for v in precision["calibration_max_abs"].values())
    step = manifest.graphs["dit_step"]
    expected = precision["components"]["dit"]
    assert step.input("time_table").dtype == expected and step.input("latent").dtype == "float32"
    model = onnx.load(str(out / step.file))
    weights = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in model.graph.initializer}
    assert np.dtype(np.float16) in weights
    parity = json.loads((out / "parity.json").read_text())
    assert parity["all_passed"] and parity["graphs"]["dit_step"]["bound"] == 3e-2


def test_overflowing_component_falls_back_to_fp32():
    from semvoc.export.precision import OVERFLOW_LIMIT, plan_precision

    plan = plan_precision("float16", {"text_encoder.model.encoder.block.1.layer.1": 3 * OVERFLOW_LIMIT,
                                      "dit.in_blocks.0": 10.0})
    assert plan.components == {"text": "float32", "dit": "float16", "vocoder": "float16", "semantic": "float16"}
    assert plan.overflow_sites["text"] == ["text_encoder.model.encoder.block.1.layer.1"]
    assert "fp32" in plan.notes[0]


# ----------------------------------------------------------------------------- bad input


def _nothing_left(parent: Path) -> bool:
    return not any(p.name.startswith(".") and "partial" in p.name for p in parent.iterdir())


def test_missing_checkpoint(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config.json not found" in err and "huggingface-cli download" in err
    assert not (tmp_path / "o").exists()


def test_mismatched_config(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_config": {"_target_": "x.Y", "backbone": {
        "_target_": "models.dit.mask_dit.UDiT", "embed_dim": 64, "warp_factor": 9}}}))
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "warp_factor" in capsys.readouterr().err


def test_wrong_weights_list_every_key(tmp_path, capsys):
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from semvoc.models.config import preset
    from tests.test_models import _official_config

    cfg = dataclasses.replace(preset("demo"), semantic=None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = _official_config(cfg)
    config["model_config"]["autoencoder"]["encoder_name"] = "none"
    config["model_config"]["content_encoder"]["text_encoder"]["t5_config"] = cfg.text.t5
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file({"model.backbone.bogus": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "unexpected keys (1)" in err and "model.backbone.bogus" in err


def test_unknown_component_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--preset", "demo", "--components", "text,warp", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "warp" in capsys.readouterr().err


def test_non_empty_out_needs_force(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--preset", "demo", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_out(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # chmod cannot lock out root (CI runs as root), so the OS answer is simulated
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert export_main(["--preset", "demo", "--out", str(locked / "engine")]) == 2
    assert "permission denied" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert export_main(["--preset", "demo", "--out", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_parity_failure_stops_the_export_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import semvoc.export.engine as engine

    monkeypatch.setitem(engine.BOUNDS, "float32", 0.0)  # every graph now "fails"
    out = tmp_path / "strict"
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out)]) == 2
    assert "parity error" in capsys.readouterr().err
    assert not out.exists() and _nothing_left(tmp_path)
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out),
                        "--allow-parity-failure"]) == 0
    assert json.loads((out / "parity.json").read_text())["all_passed"] is False


def test_interrupted_or_failing_export_leaves_nothing_and_keeps_the_old_engine(tmp_path, monkeypatch, capsys):
    import semvoc.export.engine as engine

    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.txt").write_text("previous engine")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_parity", boom)
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out), "--force"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "previous engine" and _nothing_left(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "_parity", disk_full)
    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out), "--force"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert (out / "old.txt").exists() and _nothing_left(tmp_path)


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = capsys.readouterr().out
    for phrase in ("--fp16", "--batch-sizes", "manifest.json", "huggingface-cli download", "atomic"):
        assert phrase in text


def test_parity_samples_keep_consecutive_steps_inside_the_schedule():
    """The parity check runs several steps from a drawn start; the vocoder's x1-prediction is
    infinite at t = 1, which the official loop never evaluates, so no draw may reach it."""
    import torch

    from semvoc.export.graphs import Dims
    from semvoc.export.samples import pipeline_feeds
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    model = build_model(preset("demo"), seed=0).eval()
    dims = Dims.of(model, 24, 40, 40)
    starts = set()
    for seed in range(40):
        feeds = pipeline_feeds(model, dims, 1, 25, seed, torch.float32, vocoder_steps=8,
                               components={"text", "vocoder"}, loop_steps=3)
        start = int(feeds["step"])
        assert start + 3 <= 8, seed  # steps start .. start+2 use t_span[0..7]
        assert float(feeds["t_span"][start + 2]) < 1.0
        starts.add(start)
    assert starts == set(range(6))  # and every legal start is drawn


# ----------------------------------------------------------------------------- no tracebacks, stale partials


def _demo_checkpoint(folder: Path) -> Path:
    """A checkpoint folder of the official layout with a valid config.json (demo shapes)."""
    import dataclasses

    from semvoc.models.config import preset
    from tests.test_models import _official_config

    cfg = dataclasses.replace(preset("demo"), semantic=None)
    folder.mkdir()
    config = _official_config(cfg)
    config["model_config"]["autoencoder"]["encoder_name"] = "none"
    config["model_config"]["content_encoder"]["text_encoder"]["t5_config"] = cfg.text.t5
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_corrupt_safetensors_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    ckpt = _demo_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    args = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot read {ckpt / 'model.safetensors'}" in err and "download it again" in err
    from semvoc.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):  # --debug: the exception propagates with its traceback
        export_main([*args, "--debug"])
    assert not (tmp_path / "o").exists() and _nothing_left(tmp_path)


def test_damaged_config_and_tokenizer_name_the_file(tmp_path, capsys):
    ckpt = _demo_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{\"model_config\": ")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'config.json'}" in err and "not valid JSON" in err and "Traceback" not in err
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("[1, 2")
    assert export_main(["--preset", "demo", "--tokenizer", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the tokenizer {bad / 'tokenizer.json'}" in err and "Traceback" not in err
    assert export_main(["--checkpoint", str(ckpt / "config.json"), "--out", str(tmp_path / "o")]) == 2
    assert "is a file: pass the folder" in capsys.readouterr().err


def test_runtime_only_install_is_told_to_install_the_export_extra(tmp_path):
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):  # what a `pip install semvoc` (no extras) lacks
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript", "safetensors"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, Block())
        from semvoc.export.cli import main
        sys.exit(main(["--preset", "demo", "--out", {str(tmp_path / "o")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'semvoc[export]'" in proc.stderr and "torch" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_export_killed_hard_leaves_a_partial_that_the_next_export_removes(tmp_path, capsys):
    """A real SIGKILL in the middle of an export; a running export's partial folder is never touched."""
    import fcntl
    import signal

    out = tmp_path / "engine"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import semvoc.export.engine as engine
        from semvoc.export.cli import main

        def killed(tmp, source, options, stamps):
            (tmp / "half.onnx").write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)

        engine._export_into = killed
        main(["--preset", "demo", "--components", "text", "--out", {str(out)!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".engine.partial-")]
    assert len(partials) == 1 and (partials[0] / "half.onnx").exists() and not out.exists()

    # beside it, an export still running: its lock is held (here by this process), so its folder
    # stays and a second export to the same --out is refused; the dead one's folder goes
    running = tmp_path / ".engine.partial-999999"
    running.mkdir()
    lock = tmp_path / ".engine.export-999999.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"removed {partials[0]}" in err and "killed before it finished" in err
        assert "another export to" in err and "process 999999" in err
        assert running.is_dir() and not partials[0].exists()
    running.rmdir()
    lock.unlink()

    assert export_main([*DEMO_EXPORT_ARGS, "--components", "text", "--out", str(out)]) == 0
    assert (out / "manifest.json").exists() and _nothing_left(tmp_path)
    assert not list(tmp_path.glob(".engine.export-*.lock"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_vocoder_prepare_runs_the_conditioning_at_the_latent_rate(channels_last):
    """The export's vocoder_prepare computes cond_mlp and every block's cond_proj on the latent
    frames and repeats the result; it must equal the model's own upsample-then-project path."""
    import torch

    from semvoc.export import wrappers as W
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    vocoder = build_model(preset("demo"), seed=0).vocoder.eval()
    gen = torch.Generator().manual_seed(0)
    frames = 7
    latents = torch.randn(2, vocoder.cfg.latent_dim, frames, generator=gen)
    with torch.no_grad():
        tables = W.VocoderPrepare(vocoder, channels_last=channels_last)(latents)
        cond = vocoder.encode_cond(latents)
        samples = frames * vocoder.cfg.hop_length
        for est, table in zip(vocoder.estimators, tables, strict=True):
            expected = torch.stack(est.cond_biases(cond, samples))  # [n, B, C, L]
            if channels_last:
                expected = expected.transpose(2, 3)
            assert table.shape == expected.shape
            torch.testing.assert_close(table, expected, rtol=1e-5, atol=1e-5)
