"""The prompts job (semvoc.runtime.jobs): batch bounds, name collisions, provenance, resume, overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from semvoc.runtime import jobs
from semvoc.runtime.cli import main as run_main
from semvoc.runtime.pipeline import Pipeline

SHORT = ["--steps", "4", "--vocoder-steps", "3", "--quiet"]


def _prompts(tmp_path: Path, records: list[dict], name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _run(engine, prompts, out, *extra):
    return run_main(["--engine", str(engine), "--prompts", str(prompts), "--out-dir", str(out), *SHORT, *extra])


@pytest.fixture()
def calls(monkeypatch):
    """Records the batch size of every Pipeline.generate call."""
    sizes: list[int] = []
    real = Pipeline.generate

    def spy(self, prompts, **kwargs):
        sizes.append(len(prompts))
        return real(self, prompts, **kwargs)

    monkeypatch.setattr(Pipeline, "generate", spy)
    return sizes


@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_below_one_is_refused(demo_engine, tmp_path, capsys, calls, value):
    prompts = _prompts(tmp_path, [{"caption": "rain"}])
    code = _run(demo_engine, prompts, tmp_path / "o", "--batch-size", value)
    assert code != 0 and f"--batch-size must be >= 1 (got {value})" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "o").exists()


def test_large_batch_size_runs_in_bucket_chunks_written_as_they_finish(demo_engine, tmp_path, capsys,
                                                                       monkeypatch):
    prompts = _prompts(tmp_path, [{"caption": c, "audio_id": f"c{i}"} for i, c in
                                  enumerate(["rain", "wind", "a bell", "birds", "a car"])])
    out = tmp_path / "o"
    seen_before_call: list[list[str]] = []
    sizes: list[int] = []
    real = Pipeline.generate

    def spy(self, batch, **kwargs):
        seen_before_call.append(sorted(p.name for p in out.glob("*.wav")) if out.exists() else [])
        sizes.append(len(batch))
        return real(self, batch, **kwargs)

    monkeypatch.setattr(Pipeline, "generate", spy)
    assert _run(demo_engine, prompts, out, "--batch-size", "1000") == 0
    assert "runs in batches of 2" in capsys.readouterr().err
    assert sizes == [2, 2, 1]  # the demo engine's largest bucket is 2
    assert seen_before_call == [[], ["c0.wav", "c1.wav"], ["c0.wav", "c1.wav", "c2.wav", "c3.wav"]]
    assert sorted(p.name for p in out.glob("*.wav")) == [f"c{i}.wav" for i in range(5)]


@pytest.mark.parametrize("ids", [("Y1.wav", "Y1.flac"), ("dog", "DOG"), ("a b", "a:b")])
def test_colliding_names_are_refused_before_any_work(demo_engine, tmp_path, capsys, calls, ids):
    prompts = _prompts(tmp_path, [{"caption": "rain", "audio_id": "x"},
                                  {"caption": "wind", "audio_id": ids[0]},
                                  {"caption": "bell", "audio_id": ids[1]}])
    code = _run(demo_engine, prompts, tmp_path / "o")
    err = capsys.readouterr().err
    assert code != 0 and "prompts #2 and #3 would both write" in err and "audio_id" in err
    assert calls == [] and not (tmp_path / "o").exists()


def test_same_caption_twice_without_ids_gets_two_files(demo_engine, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a bell\na bell\n")
    assert _run(demo_engine, prompts, tmp_path / "o") == 0
    names = sorted(p.name for p in (tmp_path / "o").glob("*.wav"))
    assert names == ["00000_a_bell.wav", "00001_a_bell.wav"]
    a, b = (sf.read(tmp_path / "o" / n)[0] for n in names)
    assert not np.allclose(a, b)  # noise from (seed, index): different indices, different audio


def test_resume_skips_only_files_made_by_the_same_request(demo_engine, tmp_path, capsys, calls):
    prompts = _prompts(tmp_path, [{"caption": "rain", "audio_id": "r"}, {"caption": "wind", "audio_id": "w"}])
    out = tmp_path / "o"
    assert _run(demo_engine, prompts, out) == 0
    record = json.loads((out / "r.wav.json").read_text())
    assert record["prompt"] == "rain" and record["index"] == 0 and record["seed"] == 0
    assert record["steps"] == 4 and record["vocoder_steps"] == 3 and record["duration"] == 1.0
    assert len(record["engine"]) == 64
    stamp = (out / "r.wav").stat().st_mtime_ns
    capsys.readouterr()

    calls.clear()
    assert _run(demo_engine, prompts, out) == 0  # same request: nothing to do
    assert "skipping 2 existing" in capsys.readouterr().err and calls == []

    for changed in (["--seed", "1"], ["--guidance", "2"]):  # another request: refused, files untouched
        code = _run(demo_engine, prompts, out, *changed)
        err = capsys.readouterr().err
        assert code != 0 and "--overwrite" in err and "(and 1 more)" in err
        assert calls == [] and (out / "r.wav").stat().st_mtime_ns == stamp
    assert "seed 0 -> 1" in _capture(demo_engine, prompts, out, capsys, "--seed", "1")

    prompts.write_text(json.dumps({"caption": "heavy rain", "audio_id": "r"}) + "\n")  # another prompt
    assert "'rain' -> 'heavy rain'" in _capture(demo_engine, prompts, out, capsys)

    assert _run(demo_engine, prompts, out, "--overwrite") == 0
    assert calls == [1]
    assert json.loads((out / "r.wav.json").read_text())["prompt"] == "heavy rain"


def _capture(engine, prompts, out, capsys, *extra) -> str:
    assert _run(engine, prompts, out, *extra) != 0
    return capsys.readouterr().err


def test_a_wav_without_a_record_is_not_taken_as_done(demo_engine, tmp_path, capsys, calls):
    out = tmp_path / "o"
    out.mkdir()
    sf.write(out / "r.wav", np.zeros(100, np.float32), 24000)
    prompts = _prompts(tmp_path, [{"caption": "rain", "audio_id": "r"}])
    code = _run(demo_engine, prompts, out)
    assert code != 0 and "no readable r.wav.json" in capsys.readouterr().err and calls == []
    assert _run(demo_engine, prompts, out, "--overwrite") == 0
    assert sf.read(out / "r.wav")[0].shape == (24000,)


def test_another_engine_makes_files_stale(tmp_path):
    request = jobs.Request(seed=0, steps=4, vocoder_steps=3, guidance=3.5, duration=1.0)
    items = [("rain", "r")]
    plan = jobs.plan_outputs(items, request, "a" * 64, out_dir=tmp_path)
    jobs.write_clip(plan.todo[0], np.zeros(10, np.float32), 24000, plan.todo[0].record(request, "a" * 64))
    assert jobs.plan_outputs(items, request, "a" * 64, out_dir=tmp_path).todo == []
    with pytest.raises(ValueError, match=r"engine 'aaaa.*' -> 'bbbb"):
        jobs.plan_outputs(items, request, "b" * 64, out_dir=tmp_path)
    assert len(jobs.plan_outputs(items, request, "b" * 64, out_dir=tmp_path, overwrite=True).todo) == 1


def test_a_crash_while_replacing_never_leaves_a_wav_with_a_wrong_record(tmp_path, monkeypatch):
    from semvoc.runtime import audio

    old = jobs.Request(seed=0, steps=4, vocoder_steps=3, guidance=3.5, duration=1.0)
    new = jobs.Request(seed=1, steps=4, vocoder_steps=3, guidance=3.5, duration=1.0)
    clip = jobs.plan_outputs([("rain", "r")], old, "e", out_dir=tmp_path).todo[0]
    jobs.write_clip(clip, np.zeros(10, np.float32), 24000, clip.record(old, "e"))

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(audio, "write_wav_atomic", disk_full)
    with pytest.raises(OSError):
        jobs.write_clip(clip, np.ones(10, np.float32), 24000, clip.record(new, "e"))
    assert not clip.path.exists()  # the stale wav went first; the new record alone is harmless
    assert [p.name for p in tmp_path.iterdir()] == ["r.wav.json"]
    assert jobs.plan_outputs([("rain", "r")], new, "e", out_dir=tmp_path).todo == [clip]


def test_request_values_are_checked_before_any_work(demo_engine, tmp_path, capsys, calls):
    prompts = _prompts(tmp_path, [{"caption": "rain"}])
    for bad, message in ((["--steps", "0"], "--steps 0: must be at least 1"),
                         (["--duration", "3"], "--duration 3: is not an exported bucket"),
                         (["--guidance", "nan"], "--guidance nan: must be a finite number")):
        assert _run(demo_engine, prompts, tmp_path / "o", *bad) == 2  # a usage error (see --help)
        assert message in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "o").exists()


def test_prompts_job_runs_without_ray_and_torch(demo_engine, tmp_path):
    """The runtime and its prompts job import neither ray nor torch; --ray then says what to install."""
    prompts = _prompts(tmp_path, [{"caption": "rain", "audio_id": "r"}])
    from tests.conftest import run_without

    proc = run_without(("ray", "torch", "fastapi", "starlette", "onnx"), f"""
        from semvoc.runtime.cli import main
        common = ["--engine", {str(demo_engine)!r}, "--prompts", {str(prompts)!r}, "--steps", "3",
                  "--vocoder-steps", "2", "--quiet"]
        assert main([*common, "--out-dir", {str(tmp_path / "o")!r}]) == 0
        assert main([*common, "--out-dir", {str(tmp_path / "r")!r}, "--ray"]) == 2
        assert not [m for m in sys.modules if m.split(".")[0] in ("ray", "torch")]
    """)
    assert proc.returncode == 0, proc.stderr
    assert "--ray needs Ray: pip install 'semvoc[serve]'" in proc.stderr
    assert (tmp_path / "o" / "r.wav").is_file() and not (tmp_path / "r").exists()


def test_orphan_temps_of_the_planned_clips_are_removed_and_nothing_else(tmp_path):
    clips = [jobs.Clip(i, f"p{i}", None, tmp_path / f"clip{i}.wav") for i in (1, 2)]
    orphans = [tmp_path / ".clip1.wav.ab12cd.tmp", tmp_path / ".clip1.wav.json.ef34gh.tmp",
               tmp_path / ".clip2.wav.x9.tmp"]
    kept = [tmp_path / ".clip10.wav.zz.tmp",  # another clip whose name starts the same
            tmp_path / "clip1.wav", tmp_path / ".clip1.wav.partial", tmp_path / ".hidden"]
    for path in orphans + kept:
        path.write_bytes(b"x")
    assert jobs.remove_orphan_temps(clips) == len(orphans)
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in kept)
