"""semvoc-run / semvoc.runtime: parity with PyTorch, no torch, determinism, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from semvoc.runtime.cli import main as run_main
from semvoc.runtime.manifest import EngineError
from semvoc.runtime.pipeline import Pipeline

SHORT = ["--steps", "5", "--vocoder-steps", "4"]
PROMPTS = ["a dog barks while rain falls on a tin roof", "church bells ring"]


@pytest.fixture(scope="module")
def pipe(demo_engine):
    return Pipeline(demo_engine, "onnxruntime-cpu")


@pytest.fixture(scope="module")
def eager(demo_engine):
    from semvoc.models import build_model, preset
    from semvoc.models.pipeline import EagerPipeline
    from semvoc.runtime.tokenizer import TextTokenizer

    manifest = json.loads((demo_engine / "manifest.json").read_text())
    model = build_model(preset("demo"), seed=manifest["model"]["seed"])
    return EagerPipeline(model, TextTokenizer(demo_engine / "tokenizer.json", manifest["buckets"]["text_tokens"]))


@pytest.mark.parametrize("batch", [1, 2])
def test_text_to_audio_matches_pytorch(pipe, eager, batch):
    from semvoc.models.pipeline import GenerationSettings

    result = pipe.generate(PROMPTS[:batch], seed=11, steps=6, vocoder_steps=5)
    reference = eager.text_to_audio(PROMPTS[:batch], seed=11,
                                    settings=GenerationSettings(num_steps=6, vocoder_steps=5, duration_s=1.0))
    assert result.audio.shape == reference.shape == (batch, 24000)
    assert np.abs(result.audio - reference).max() <= 1e-3
    assert np.abs(result.audio).max() > 1e-3  # not silence
    assert result.dit_calls == 6  # the sway schedule's 7th call (dt = 0) is skipped


@pytest.mark.parametrize("rate", [24000, 44100])
def test_resynthesis_matches_pytorch(pipe, eager, rate):
    from semvoc.runtime.audio import resample

    wav = np.random.default_rng(rate).uniform(-0.4, 0.4, rate).astype(np.float32)  # one second
    result = pipe.resynthesize(wav, rate, seed=5, vocoder_steps=4)
    wav24 = resample(wav, rate, 24000)  # the eager path's encoder resamples 24 kHz itself
    reference = eager.resynthesize(wav24[None], seed=5, vocoder_steps=4) if rate == 24000 else None
    assert result.audio.shape == (1, 24000)
    if reference is not None:
        assert np.abs(result.audio - reference).max() <= 1e-3


def test_same_seed_same_audio_other_seed_other_audio(pipe):
    a = pipe.generate(PROMPTS[:1], seed=3, steps=4, vocoder_steps=3).audio
    b = pipe.generate(PROMPTS[:1], seed=3, steps=4, vocoder_steps=3).audio
    c = pipe.generate(PROMPTS[:1], seed=4, steps=4, vocoder_steps=3).audio
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_prompt_audio_does_not_depend_on_batching(pipe):
    together = pipe.generate(PROMPTS, seed=9, steps=4, vocoder_steps=3).audio
    second = pipe.generate(PROMPTS[1:], seed=9, indices=[1], steps=4, vocoder_steps=3).audio
    np.testing.assert_allclose(together[1:], second, atol=1e-5)


def test_runtime_imports_no_torch(demo_engine, tmp_path):
    """Generation in a process where torch, transformers and onnx cannot be imported."""
    from tests.conftest import run_without

    proc = run_without(("torch", "transformers", "onnx", "onnxscript", "safetensors"), f"""
        from semvoc.runtime.cli import main
        code = main(["--engine", {str(demo_engine)!r}, "--prompt", "rain", "--out", {str(tmp_path / "a.wav")!r},
                     "--steps", "3", "--vocoder-steps", "2", "--quiet"])
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")]
        sys.exit(code)
    """)
    assert proc.returncode == 0, proc.stderr
    audio, rate = sf.read(tmp_path / "a.wav")
    assert rate == 24000 and audio.shape == (24000,)


def test_cli_writes_wavs_and_resumes(demo_engine, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"audio_id": f"Y{i}.wav", "caption": c})
                                 for i, c in enumerate(["birds chirp", "a car passes", "wind blows"])))
    out = tmp_path / "wavs"
    assert run_main(["--engine", str(demo_engine), "--prompts", str(prompts), "--out-dir", str(out),
                     "--batch-size", "2", "--quiet", *SHORT]) == 0
    assert sorted(p.name for p in out.glob("*.wav")) == ["Y0.wav", "Y1.wav", "Y2.wav"]
    assert "real-time factor" in capsys.readouterr().err
    before = (out / "Y1.wav").stat().st_mtime_ns
    (out / "Y2.wav").unlink()
    assert run_main(["--engine", str(demo_engine), "--prompts", str(prompts), "--out-dir", str(out),
                     "--quiet", *SHORT]) == 0
    assert "skipping 2 existing" in capsys.readouterr().err
    assert (out / "Y1.wav").stat().st_mtime_ns == before and (out / "Y2.wav").exists()
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_plain_text_prompts_file(demo_engine, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a bell\n\nthunder far away\n")
    assert run_main(["--engine", str(demo_engine), "--prompts", str(prompts), "--out-dir", str(tmp_path / "o"),
                     "--quiet", *SHORT]) == 0
    assert len(list((tmp_path / "o").glob("*.wav"))) == 2


# ----------------------------------------------------------------------------- bad input


def _run(args, capsys):
    code = run_main(args)
    return code, capsys.readouterr().err


def test_empty_prompt(demo_engine, tmp_path, capsys):
    code, err = _run(["--engine", str(demo_engine), "--prompt", "  ", "--out", str(tmp_path / "a.wav")], capsys)
    assert code == 2 and "empty" in err and not (tmp_path / "a.wav").exists()


def test_long_prompt_is_truncated_with_a_warning(pipe):
    long_prompt = " ".join(["a dog barks and a cat meows"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        result = pipe.generate([long_prompt], steps=2, vocoder_steps=2)
    assert result.truncated == [True]


def test_unsupported_duration_and_steps(demo_engine, tmp_path, capsys):
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
                      "--duration", "7", *SHORT], capsys)
    assert code == 2 and "--duration 7: is not an exported bucket" in err and "1 s" in err
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
                      "--steps", "500"], capsys)
    assert code == 2 and "--steps 500:" in err and "at most 40" in err and "--max-steps 500" in err


def test_batch_over_the_bucket_on_padding_backends(pipe):
    pipe.backend.pads_batches = True  # what the CUDA and TensorRT backends declare
    try:
        assert pipe._batch_bucket(1) == 1 and pipe._batch_bucket(2) == 2
        with pytest.raises(EngineError, match="largest exported batch bucket 2"):
            pipe._batch_bucket(3)
    finally:
        pipe.backend.pads_batches = False


def test_corrupt_and_missing_engine_files(engine_copy, tmp_path, capsys):
    data = bytearray((engine_copy / "dit_time.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine_copy / "dit_time.onnx").write_bytes(bytes(data))
    (engine_copy / "vocoder_time.onnx").unlink()
    code, err = _run(["--engine", str(engine_copy), "--prompt", "x", "--out", str(tmp_path / "a.wav")], capsys)
    assert code == 2 and "sha256 mismatch): dit_time.onnx" in err and "missing: vocoder_time.onnx" in err


def test_manifest_from_another_schema(engine_copy, tmp_path, capsys):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run(["--engine", str(engine_copy), "--prompt", "x", "--out", str(tmp_path / "a.wav")], capsys)
    assert code == 2 and "schema version 99" in err and "Re-export" in err


def test_not_an_engine(tmp_path, capsys):
    code, err = _run(["--engine", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.wav")], capsys)
    assert code == 2 and "no manifest.json" in err


def test_cuda_backend_on_a_cpu_machine(demo_engine, tmp_path, capsys):
    from semvoc.runtime.backends.ort_common import cuda_available

    if cuda_available():
        pytest.skip("this machine has a CUDA GPU")
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
                      "--backend", "onnxruntime-cuda"], capsys)
    assert code == 2 and "not available" in err and "would pick onnxruntime-cpu" in err


def test_unwritable_output(demo_engine, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # chmod cannot lock out root (CI runs as root), so the OS answer is simulated
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(locked / "a.wav")], capsys)
    assert code == 2 and "permission denied" in err and list(locked.iterdir()) == []


def test_output_path_that_cannot_be_written(demo_engine, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output directory should be
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(blocker / "a.wav"), *SHORT],
                     capsys)
    assert code == 2 and f"{blocker} is a file, not a directory" in err


def test_nan_in_a_loop_names_the_graph_and_step(pipe, monkeypatch):
    from semvoc.runtime.backends.base import NonFiniteError

    real = pipe.backend._run
    calls = {"n": 0}

    def poisoned(kind, feeds, duration_s=None):
        out = real(kind, feeds, duration_s)
        if kind == "dit_step":
            calls["n"] += 1
            if calls["n"] == 3:
                out[0] = out[0] * np.float32("nan")
        return out

    monkeypatch.setattr(pipe.backend, "_run", poisoned)
    with pytest.raises(NonFiniteError, match="dit_step at step 2") as err:
        pipe.generate(["x"], steps=5, vocoder_steps=2)
    assert "fp32" in str(err.value)


def test_unreadable_and_empty_audio(demo_engine, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav at all")
    code, err = _run(["--engine", str(demo_engine), "--audio", str(bad), "--out", str(tmp_path / "o.wav")], capsys)
    assert code == 2 and "cannot read audio file" in err
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    code, err = _run(["--engine", str(demo_engine), "--audio", str(empty), "--out", str(tmp_path / "o.wav")], capsys)
    assert code == 2 and "empty" in err
    code, err = _run(["--engine", str(demo_engine), "--audio", str(tmp_path / "none.wav"),
                      "--out", str(tmp_path / "o.wav")], capsys)
    assert code == 2 and "not found" in err
    assert not (tmp_path / "o.wav").exists()


def test_stereo_audio_any_rate(demo_engine, tmp_path, capsys):
    stereo = tmp_path / "in.wav"
    sf.write(stereo, np.random.default_rng(0).uniform(-0.3, 0.3, (22050, 2)).astype(np.float32), 44100)
    code, _ = _run(["--engine", str(demo_engine), "--audio", str(stereo), "--out", str(tmp_path / "o.wav"),
                    "--vocoder-steps", "3", "--quiet"], capsys)
    audio, rate = sf.read(tmp_path / "o.wav")
    assert code == 0 and rate == 24000 and audio.shape == (12000,)  # half a second, resampled


def test_ctrl_c_leaves_no_partial_file(demo_engine, tmp_path, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "generate", interrupted)
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav"), *SHORT],
                     capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(demo_engine, tmp_path, capsys):
    for args in (["--prompt", "x"], ["--prompt", "x", "--prompts", "f", "--out", "a.wav"],
                 ["--prompt", "x", "--prompt", "y", "--out", str(tmp_path / "a.wav")],
                 ["--prompt", "x", "--out", str(tmp_path / "a.mp3")],
                 ["--audio", "in.wav", "--steps", "10", "--out", str(tmp_path / "a.wav")],  # no DiT for --audio
                 ["--audio", "in.wav", "--guidance", "2", "--out", str(tmp_path / "a.wav")]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(["--engine", str(demo_engine), *args])
        assert exit_info.value.code == 2
        if "--audio" in args:
            assert "which --audio does not run" in capsys.readouterr().err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        run_main(["--help"])
    text = capsys.readouterr().out
    for phrase in ("--prompts", "--backend", "resumable", "--audio", "seed", "exit status", "--debug",
                   "crossfaded"):
        assert phrase in text


def test_written_wav_is_atomic(tmp_path, monkeypatch):
    from semvoc.runtime import audio as audio_mod

    def failing_write(*args, **kwargs):
        raise OSError("disk full")

    import soundfile

    monkeypatch.setattr(soundfile.SoundFile, "write", failing_write)
    with pytest.raises(OSError):
        audio_mod.write_wav_atomic(tmp_path / "x.wav", np.zeros(10, np.float32), 24000)
    assert list(Path(tmp_path).iterdir()) == []


def test_device_loop_buffers_share_tables_across_buckets(demo_engine):
    """The buffer layout the CUDA and TensorRT backends capture (checked with a fake allocator)."""
    from semvoc.runtime.backends.base import bucket_symbols, loop_buffers, ping_pong_wiring
    from semvoc.runtime.manifest import load_manifest

    manifest = load_manifest(demo_engine, verify=False)
    graph = manifest.graph("vocoder_step")
    tables: dict = {}
    shared = ("t_span", "time_scale_0", "time_scale_1", "time_scale_2")

    def alloc(shape, dtype):
        return (tuple(shape), dtype)

    one = loop_buffers(graph, bucket_symbols(manifest, 1, 25), "audio", shared, tables, alloc)
    two = loop_buffers(graph, bucket_symbols(manifest, 2, 25), "audio", shared, tables, alloc)
    assert one["audio"] == one["audio_b"] == ((1, 24000), "float32") and two["audio"][0] == (2, 24000)
    assert one["cond_bias_0"] == ((2, 1, 48, 101), graph.input("cond_bias_0").dtype)
    assert one["step_b"] == ((1,), "int64") and set(tables) == set(shared)
    assert all(one[name] is two[name] for name in shared)  # one schedule table for every bucket
    assert ping_pong_wiring("audio")[1] == ("audio_b", "step_b", "audio", "step")


def test_verified_files_are_hashed_again_only_when_they_change(tmp_path, monkeypatch):
    import os

    from semvoc.runtime import manifest as M

    monkeypatch.setenv("SEMVOC_CACHE_DIR", str(tmp_path / "cache"))
    files = {}
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
        os.utime(tmp_path / name, ns=(1_000_000_000, 1_000_000_000))  # settled long ago
        files[name] = M.sha256_file(tmp_path / name)
    hashed = []
    real = M.sha256_file
    monkeypatch.setattr(M, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    assert M.verify_files(tmp_path, files) == [] and sorted(hashed) == ["a.onnx", "b.onnx"]
    hashed.clear()
    assert M.verify_files(tmp_path, files) == [] and hashed == []  # remembered
    (tmp_path / "b.onnx").write_bytes(b"x" * 6000)  # same size, new mtime: hashed, caught
    assert M.verify_files(tmp_path, files) == ["modified or corrupt (sha256 mismatch): b.onnx"]
    assert hashed == ["b.onnx"]
    monkeypatch.setenv("SEMVOC_CACHE_DIR", "")  # off: every file hashed every time
    hashed.clear()
    M.verify_files(tmp_path, files)
    assert sorted(hashed) == ["a.onnx", "b.onnx"]


def test_hashes_taken_at_export_spare_the_first_load_its_hashing(tmp_path, monkeypatch):
    """The exporter's sha256 of each file (taken as the manifest is written, before the folder is
    renamed into place) is remembered: a first load hashes only what changed since or had not
    settled when it was hashed."""
    import os
    import time

    from semvoc.runtime import manifest as M

    monkeypatch.setenv("SEMVOC_CACHE_DIR", str(tmp_path / "cache"))
    partial = tmp_path / ".engine.partial"
    partial.mkdir()
    for name in ("a.onnx", "b.onnx", "fresh.json", "changed.onnx"):
        (partial / name).write_bytes(name.encode() * 1000)
        if name != "fresh.json":  # written seconds before the hashing: not settled
            os.utime(partial / name, ns=(1_000_000_000, 1_000_000_000))
    files, stamps = {}, {}
    for path in sorted(partial.iterdir()):
        files[path.name], stamps[path.name] = M.hash_and_stamp(path)
    assert all(stamps[name] == M._stamp(partial / name) for name in files)
    partial.rename(tmp_path / "engine")  # what the exporter does last
    root = tmp_path / "engine"
    time.sleep(0.01)
    (root / "changed.onnx").write_bytes(b"y" * 12000)  # after its hash was taken
    assert sorted(M.remember_verified(root, files, stamps)) == ["a.onnx", "b.onnx"]
    hashed = []
    real = M.sha256_file
    monkeypatch.setattr(M, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    assert M.verify_files(root, files) == ["modified or corrupt (sha256 mismatch): changed.onnx"]
    assert sorted(hashed) == ["changed.onnx", "fresh.json"]
    monkeypatch.setenv("SEMVOC_CACHE_DIR", "")  # memory off: nothing is recorded
    assert M.remember_verified(root, files, stamps) == []


# ----------------------------------------------------------------------------- audio of any length

MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from semvoc.runtime.pipeline import Pipeline
    engine, src, dst = sys.argv[1:4]
    result = Pipeline(engine, "onnxruntime-cpu").resynthesize_file(src, dst, vocoder_steps=1, batch_size=2)
    print(result.windows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


def _noise_wav(path: Path, seconds: int, rate: int = 48000, channels: int = 2) -> int:
    """A PCM-16 noise file written second by second (the test process never holds it whole)."""
    rng = np.random.default_rng(seconds)
    with sf.SoundFile(path, "w", rate, channels, "PCM_16") as f:
        for _ in range(seconds):
            f.write(rng.uniform(-0.3, 0.3, (rate, channels)).astype(np.float32))
    return seconds * rate


def test_long_audio_keeps_its_length_in_bounded_memory(demo_engine, tmp_path):
    """90 s of 48-kHz stereo through 1-s windows: the whole output, and a process peak that does
    not grow with the input (reading it whole would take 35 MB decoded, 52 MB with its mono mix)."""
    peaks, windows = {}, {}
    for name, seconds in (("short", 2), ("long", 90)):
        frames = _noise_wav(tmp_path / f"{name}.wav", seconds)
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(demo_engine), str(tmp_path / f"{name}.wav"),
                               str(tmp_path / f"{name}_out.wav")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        count, peak_kib = map(int, proc.stdout.split())
        windows[name], peaks[name] = count, peak_kib / 1024
        info = sf.info(tmp_path / f"{name}_out.wav")
        assert info.samplerate == 24000 and info.frames == frames // 2  # the input's duration, at 24 kHz
    assert windows["short"] == 3 and windows["long"] == 119
    decoded_mb = 90 * 48000 * 2 * 4 / 2**20
    growth = peaks["long"] - peaks["short"]
    assert growth < 24 < decoded_mb, f"peak grew by {growth:.1f} MB with the input ({peaks})"


def test_crossfade_gains_sum_to_one_and_stitch_in_order():
    from semvoc.runtime.windows import Stitcher, crossfade_gains, plan_windows

    gains = crossfade_gains(240)
    np.testing.assert_allclose(gains + gains[::-1], 1.0, atol=1e-6)  # fade-out is the mirrored fade-in
    assert 0 < gains[0] < 0.01 and 0.99 < gains[-1] < 1
    plan = plan_windows(100_000, 24000, 24000, 25, 25, 960, 16000)  # 1-s windows of 25 frames
    assert (plan.overlap_frames, plan.hop_frames, plan.count) == (6, 19, 6)
    stitcher = Stitcher(plan)
    out = np.concatenate([stitcher.add(np.full(plan.window_samples, 0.5, np.float32)) for _ in range(plan.count)])
    assert out.shape == (100_000,)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)  # a constant stays constant across every seam
    stitcher = Stitcher(plan)
    ramps = np.concatenate([stitcher.add(np.full(plan.window_samples, float(k), np.float32))
                            for k in range(plan.count)])
    assert np.all(np.diff(ramps) >= -1e-6)  # window k fades into window k + 1, never back


def test_file_and_array_resynthesis_agree_across_windows(pipe, tmp_path):
    wav = np.random.default_rng(7).uniform(-0.3, 0.3, 44100 * 3 + 17).astype(np.float32)
    sf.write(tmp_path / "in.flac", wav, 44100)
    result = pipe.resynthesize(wav, 44100, seed=2, vocoder_steps=2)
    written = pipe.resynthesize_file(tmp_path / "in.flac", tmp_path / "out.wav", seed=2, vocoder_steps=2,
                                     batch_size=1)
    audio, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and audio.shape == result.audio[0].shape == (round(wav.size * 24000 / 44100),)
    assert written.windows == 4 and np.abs(audio - result.audio[0]).max() < 2e-4  # 16-bit PCM
    first = pipe.resynthesize(wav[:44100], 44100, seed=2, vocoder_steps=2).audio[0]  # one window alone
    np.testing.assert_allclose(result.audio[0][:18000], first[:18000], atol=1e-5)  # before the first seam


# ----------------------------------------------------------------------------- messages and exit status


def test_request_errors_name_the_option_and_share_one_exit_status(demo_engine, tmp_path, capsys):
    base = ["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav"), *SHORT]
    cases = {  # before the engine loads (--seed), after it (the others): the same status
        ("--seed", "-1"): "--seed -1: must be from 0 to 2**64 - 1",
        ("--steps", "0"): "--steps 0: must be at least 1",
        ("--vocoder-steps", "41"): "--vocoder-steps 41: this engine's tables hold at most 40",
        ("--guidance", "nan"): "--guidance nan: must be a finite number",
        ("--guidance", "1e30"): "--guidance 1e+30: must be a finite number",
        ("--threads", "0"): "--threads 0: must be a whole number >= 1",
    }
    for (option, value), message in cases.items():
        code, err = _run([*base, option, value], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (option, err)
        assert "fp16" not in err and "Traceback" not in err
    code, err = _run([*base, "--steps", "0"], capsys)
    assert "re-export" not in err  # nothing to re-export for a step count below 1
    assert not (tmp_path / "a.wav").exists()


def test_request_errors_in_the_python_api(pipe):
    from semvoc.runtime.request import RequestError

    with pytest.raises(RequestError) as err:
        pipe.generate(["x"], steps=0)
    assert (err.value.name, err.value.value) == ("steps", 0) and "at least 1" in err.value.problem
    with pytest.raises(RequestError, match="seed"):
        pipe.generate(["x"], seed=-1, steps=2, vocoder_steps=2)
    with pytest.raises(RequestError, match="guidance"):
        pipe.generate(["x"], guidance=float("inf"), steps=2, vocoder_steps=2)
    with pytest.raises(RequestError, match="whole number"):
        pipe.resynthesize(np.zeros(100, np.float32), 16000, vocoder_steps=2.5)


def test_nan_in_an_fp32_engine_is_not_blamed_on_fp16(pipe, monkeypatch):
    from semvoc.runtime.backends.base import NonFiniteError

    real = pipe.backend._run

    def poisoned(kind, feeds, duration_s=None):
        out = real(kind, feeds, duration_s)
        return [out[0] * np.float32("nan"), *out[1:]] if kind == "vocoder_step" else out

    monkeypatch.setattr(pipe.backend, "_run", poisoned)
    with pytest.raises(NonFiniteError) as err:
        pipe.generate(["x"], steps=2, vocoder_steps=2)
    assert err.value.precision == "float32" and "not an fp16 overflow" in str(err.value)
    assert "re-export without --fp16" not in str(err.value)
    assert "overflow" in str(NonFiniteError("dit_step", 3, precision="float16"))


def test_a_file_given_as_the_engine(tmp_path, capsys):
    (tmp_path / "engine.onnx").write_bytes(b"x")
    code, err = _run(["--engine", str(tmp_path / "engine.onnx"), "--prompt", "x", "--out",
                      str(tmp_path / "a.wav")], capsys)
    assert code == 2 and "is a file, not an engine directory" in err and "not found" not in err


def test_damaged_graph_without_verification_is_one_line(engine_copy, tmp_path, capsys):
    (engine_copy / "text_encoder.onnx").write_bytes(b"not a protobuf")
    args = ["--engine", str(engine_copy), "--prompt", "x", "--out", str(tmp_path / "a.wav"), "--no-verify", *SHORT]
    code, err = _run(args, capsys)
    assert code == 2 and "onnxruntime cannot load" in err and "text_encoder.onnx" in err
    assert "Traceback" not in err and err.count("semvoc-run: error") == 1
    with pytest.raises(EngineError):  # --debug lets the exception (and its traceback) through
        run_main([*args, "--debug"])


def test_an_internal_error_is_one_line_that_points_to_debug(demo_engine, tmp_path, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Pipeline, "generate", broken)
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav"), *SHORT],
                     capsys)
    assert code == 1 and "ZeroDivisionError: division by zero" in err and "--debug" in err
    assert err.strip().count("\n") == 1  # the untrained-model note, then the error


def test_audio_with_nan_samples_is_refused_by_name(demo_engine, tmp_path, capsys):
    samples = np.zeros(48000, np.float32)
    samples[30000] = np.nan  # 1.25 s into a 2-s recording: found while reading the second window
    sf.write(tmp_path / "nan.wav", samples, 24000, subtype="FLOAT")
    code, err = _run(["--engine", str(demo_engine), "--audio", str(tmp_path / "nan.wav"), "--out",
                      str(tmp_path / "o.wav"), "--vocoder-steps", "2", "--quiet"], capsys)
    assert code == 2 and "nan.wav holds NaN or infinite samples (the first at 1.250 s)" in err
    assert "fp16" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["nan.wav"]  # no partial output


def test_a_default_step_count_beyond_the_engines_tables_names_the_option(demo_engine, tmp_path, capsys):
    manifest = json.loads((demo_engine / "manifest.json").read_text())
    assert manifest["defaults"]["steps"] == 100 and manifest["buckets"]["max_dit_steps"] == 40
    code, err = _run(["--engine", str(demo_engine), "--prompt", "x", "--out", str(tmp_path / "a.wav")], capsys)
    assert code == 2 and "--steps 100: is the engine's default" in err and "give 1..40" in err


def test_sigterm_during_long_audio_leaves_no_partial_file(demo_engine, tmp_path):
    import signal
    import time

    _noise_wav(tmp_path / "long.wav", 600, rate=16000, channels=1)
    # 40 vocoder steps per window: the run lasts minutes, so the signal always lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "semvoc.runtime.cli", "--engine", str(demo_engine), "--audio",
                             str(tmp_path / "long.wav"), "--out", str(tmp_path / "o.wav"), "--vocoder-steps", "40",
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.wav.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # until the output's temp file exists: the run is writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err and "no partial file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav"]


def test_hand_edited_manifest_entries_are_named(engine_copy, tmp_path, capsys):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["buckets"]["durations_s"] = []  # the manifest is not in its own sha256 list: checked by shape
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run(["--engine", str(engine_copy), "--prompt", "x", "--out", str(tmp_path / "a.wav"), *SHORT], capsys)
    assert code == 2 and "malformed (buckets.durations_s = [])" in err and "Traceback" not in err


def test_a_cuda_session_that_onnxruntime_puts_on_the_cpu_is_refused(demo_engine):
    """onnxruntime quietly retries on the CPU a session it cannot make on the GPU (here: no GPU
    build at all); semvoc's GPU backend must say so instead of running many times slower."""
    from semvoc.runtime.backends.base import BackendUnavailable
    from semvoc.runtime.backends.ort_common import conv_algo_search, make_session

    graph = demo_engine / "dit_time.onnx"
    assert make_session(graph, "cpu").get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailable, match=r"dit_time\.onnx on the GPU and fell back to the CPU"):
        make_session(graph, "cuda")
    # the semantic encoder keeps cuDNN's exhaustive search (its patch convolution has no heuristic plan)
    assert conv_algo_search(demo_engine / "semantic_encoder_1s.onnx") == "EXHAUSTIVE"
    assert conv_algo_search(demo_engine / "vocoder_prepare.onnx") == "HEURISTIC"


def test_gpu_sessions_of_a_bucket_are_created_together(demo_engine, monkeypatch):
    """``prepare`` creates what a request needs in parallel threads, once, and runs each graph that
    runs once per request one time at the bucket's shapes; step graphs get the bucket's fixed dims
    and CUDA-graph capture (and no warm-up run), the text encoder too (warmed outside its graph,
    then run twice on this thread: onnxruntime counts one run and captures the next), the others
    the shared arena. onnxruntime's CUDA provider is replaced by recorders, so the logic runs on
    any machine."""
    import threading
    import time

    from semvoc.runtime.backends import ort_cuda
    from semvoc.runtime.backends.ort_common import NUMPY_DTYPES
    from semvoc.runtime.manifest import load_manifest

    calls, runs, shrinks, threads = [], [], [], set()

    class FakeBinding:
        def __init__(self, name):
            self.name, self.inputs = name, {}

        def bind_ortvalue_input(self, name, value):
            self.inputs[name] = value

        def bind_output(self, name, device, device_id):
            assert device == "cuda"

        def bind_ortvalue_output(self, name, value):
            pass

    class DeviceArray(np.ndarray):
        def update_inplace(self, array):
            self[...] = array

    def entry(run_options, key):
        try:
            return run_options.get_run_config_entry(key) if run_options is not None else None
        except RuntimeError:
            return None

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def io_binding(self):
            return FakeBinding(self.name)

        def run_with_iobinding(self, binding, run_options=None):
            runs.append((self.name, {k: (v.shape, v.dtype, float(v.flat[0])) for k, v in binding.inputs.items()}))
            shrinks.append((entry(run_options, "memory.enable_memory_arena_shrinkage"),
                            entry(run_options, "gpu_graph_id")))

    def fake_session(path, provider, **kwargs):
        threads.add(threading.get_ident())
        time.sleep(0.05)  # a load takes time: the pool's threads overlap
        calls.append((Path(path).name, kwargs))
        if Path(path).name == "vocoder_step.onnx" and kwargs["cuda_graph"]:
            raise RuntimeError("capture refused")  # left for _bind_loop's uncaptured retry
        return FakeSession(Path(path).name)

    monkeypatch.setattr(ort_cuda, "make_session", fake_session)
    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, "onnxruntime")  # the whole-loop mode: tests/test_cuda_graphs.py
    manifest = load_manifest(demo_engine, verify=False)
    backend = ort_cuda.OrtCudaBackend(manifest)
    monkeypatch.setattr(backend, "_upload", lambda array, dtype: array)  # no device here
    monkeypatch.setattr(backend, "_empty", lambda shape, dtype: np.zeros(shape, NUMPY_DTYPES[dtype]).view(DeviceArray))
    backend.prepare(1, 25)
    made = {name: kwargs for name, kwargs in calls}
    once = {"text_encoder.onnx", "dit_prepare.onnx", "dit_time.onnx", "vocoder_prepare.onnx", "vocoder_time.onnx"}
    assert set(made) == once | {"dit_step.onnx", "vocoder_step.onnx"}
    for name, kwargs in made.items():
        captured = name in ("dit_step.onnx", "vocoder_step.onnx", "text_encoder.onnx")
        assert kwargs["cuda_graph"] is captured and kwargs["shared_arena"] is not captured
        assert (kwargs["dim_overrides"] is not None) is captured
    assert made["dit_step.onnx"]["dim_overrides"]["batch"] == made["text_encoder.onnx"]["dim_overrides"]["batch"] == 1
    assert len(backend._sessions) == 6 and len(threads) > 1  # the refused capture is not kept
    warmed = dict(runs)
    assert set(warmed) == once  # step graphs are not run here: their capture happens in the request
    # the warm-up runs overlap, so each gives the shared arena's free regions back when it ends; the
    # text encoder's runs outside (-1) and into its own graph keep the regions of its own arena
    text = [shrink for (name, _), shrink in zip(runs, shrinks, strict=True) if name == "text_encoder.onnx"]
    assert text == [(None, "-1"), (None, None), (None, None)] and backend._captured[1].captured
    assert [shrink for (name, _), shrink in zip(runs, shrinks, strict=True)
            if name != "text_encoder.onnx"] == [("gpu:0", None)] * (len(runs) - 3)
    tokens = manifest.buckets["text_tokens"]
    assert warmed["text_encoder.onnx"]["input_ids"] == ((1, tokens), np.int64, 0.0)
    assert warmed["text_encoder.onnx"]["attention_mask"] == ((1, tokens), np.int64, 1.0)
    channels = manifest.shapes["latent_channels"]
    assert warmed["vocoder_prepare.onnx"]["latents"][0] == (1, channels, 25)

    calls.clear()
    runs.clear()
    backend.prepare(1, 25)  # only the refused one is tried again; nothing runs twice
    assert [name for name, _ in calls] == ["vocoder_step.onnx"] and runs == []
    calls.clear()
    backend.prepare(4, 25)  # another bucket: its step and text-encoder sessions; the others run at its shapes
    assert {name for name, _ in calls} == {"dit_step.onnx", "vocoder_step.onnx", "text_encoder.onnx"}
    assert {name for name, _ in runs} == once and dict(runs)["dit_prepare.onnx"]["context"][0][0] == 4

    def broken(path, provider, **kwargs):
        raise RuntimeError(f"cannot load {Path(path).name}")

    monkeypatch.setattr(ort_cuda, "make_session", broken)
    with pytest.raises(RuntimeError, match=r"cannot load semantic_encoder_1s\.onnx"):
        backend.prepare(1, 25, text=False, duration_s=1.0)


def test_prepare_can_run_the_step_graphs_once_uncaptured(demo_engine, monkeypatch):
    """SEMVOC_STEP_WARM_RUN=1: prepare() also runs each step graph's capture session once, in its
    loading thread, with gpu_graph_id -1 (onnxruntime neither counts nor captures that run) and
    without arena shrinkage (the captured runs reuse the session's regions)."""
    from semvoc.runtime.backends import ort_cuda
    from semvoc.runtime.manifest import load_manifest

    runs = {}

    class FakeBinding:
        def bind_ortvalue_input(self, name, value):
            pass

        def bind_output(self, name, device, device_id):
            pass

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def io_binding(self):
            return FakeBinding()

        def run_with_iobinding(self, binding, run_options=None):
            entries = {}
            for key in ("gpu_graph_id", "memory.enable_memory_arena_shrinkage"):
                try:
                    entries[key] = run_options.get_run_config_entry(key)
                except Exception:  # onnxruntime raises for an entry never set
                    entries[key] = None
            runs[self.name] = entries

    monkeypatch.setattr(ort_cuda, "make_session", lambda path, provider, **kw: FakeSession(Path(path).name))
    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, "onnxruntime")
    monkeypatch.setenv("SEMVOC_STEP_WARM_RUN", "1")
    backend = ort_cuda.OrtCudaBackend(load_manifest(demo_engine, verify=False))
    monkeypatch.setattr(backend, "_upload", lambda array, dtype: array)
    backend.prepare(1, 25)
    assert runs["dit_step.onnx"] == {"gpu_graph_id": "-1", "memory.enable_memory_arena_shrinkage": None}
    assert runs["vocoder_step.onnx"] == runs["dit_step.onnx"]
    monkeypatch.delenv("SEMVOC_STEP_WARM_RUN")
    runs.clear()
    backend = ort_cuda.OrtCudaBackend(load_manifest(demo_engine, verify=False))
    monkeypatch.setattr(backend, "_upload", lambda array, dtype: array)
    backend.prepare(1, 25)
    assert "dit_step.onnx" not in runs and "vocoder_step.onnx" not in runs


@pytest.mark.parametrize("custom_ops", [True, False])
def test_serving_semvoc_ops_where_an_export_ran_them_is_warned(tmp_path, monkeypatch, custom_ops):
    """A process that exported an engine with semvoc's CUDA ops is told to serve it from a new
    process; one that only serves, or serves an engine without the ops, is not."""
    import warnings

    from semvoc.runtime.backends import ort_common, ort_cuda
    from semvoc.runtime.manifest import Manifest

    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, "onnxruntime")  # no stream of its own: no GPU needed
    monkeypatch.setenv("SEMVOC_LTGEMM_ALGORITHMS", str(tmp_path / "choices.txt"))
    data = {"graphs": {}, **({"custom_ops": {"library": "kernels/libsemvoc_cuda.so"}} if custom_ops else {})}
    monkeypatch.setattr(ort_common, "_cuda_ops_exported_here", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ort_cuda.OrtCudaBackend(Manifest(tmp_path, data))  # a serving process: no warning
    ort_common.note_cuda_ops_exported()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ort_cuda.OrtCudaBackend(Manifest(tmp_path, data))
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert said == ([ort_cuda.SAME_PROCESS_WARNING] if custom_ops else [])
    assert not custom_ops or "serve it from a new process" in said[0]
