"""semvoc-serve (Ray Serve) and semvoc-run --ray (Ray Data) on a two-node Ray cluster started on
this machine (a head and a worker node, each its own raylet): HTTP on 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ray = pytest.importorskip("ray", reason="semvoc[serve] (Ray) is not installed")

from semvoc.runtime.cli import main as run_main  # noqa: E402
from semvoc.runtime.pipeline import Pipeline  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from the test cluster
STEPS = {"steps": 4, "vocoder_steps": 3}
PORT = 18231


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_pipe(demo_engine):
    return Pipeline(demo_engine, "onnxruntime-cpu")


def _poisoned_engine():
    """An Engine whose loops produce NaN for the prompt "POISON" (every other prompt runs as usual)."""
    from semvoc.serve.server import Engine

    class Poisoned(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            generate, run = self.pipe.generate, self.pipe.backend._run
            state = {"on": False}

            def poisoned_generate(prompts, **kw):
                state["on"] = "POISON" in prompts
                return generate(prompts, **kw)

            def poisoned_run(kind, feeds, duration_s=None):
                out = run(kind, feeds, duration_s)
                if state["on"] and kind == "dit_step":
                    out[0] = out[0] * np.float32("nan")
                return out

            self.pipe.generate, self.pipe.backend._run = poisoned_generate, poisoned_run

    return Poisoned


def _deploy(engine, **options):
    from ray import serve

    from semvoc.serve.server import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(str(engine), backend="onnxruntime-cpu", threads=1, engine_cls=_poisoned_engine(),
                        **options), name="semvoc", route_prefix="/")


def _post(body, timeout: float = 60.0) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/generate", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _int16(wav: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(wav), dtype="int16")[0]


def _as_wav_int16(audio: np.ndarray) -> np.ndarray:
    from semvoc.serve.server import wav_bytes

    return _int16(wav_bytes(audio, 24000))


@pytest.fixture(scope="module")
def server(cluster, demo_engine):
    _deploy(demo_engine, batch_wait_ms=100.0, max_queued=64)
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"
    return demo_engine


def test_server_wav_equals_pipeline_generate(server, local_pipe):
    status, headers, body = _post({"prompt": "a dog barks", "seed": 7, **STEPS})
    assert status == 200 and headers["content-type"] == "audio/wav"
    expected = _as_wav_int16(local_pipe.generate(["a dog barks"], seed=7, **STEPS).audio[0])
    got = _int16(body)
    assert got.shape == expected.shape == (24000,)
    assert np.abs(got.astype(np.int32) - expected).max() <= 1  # 16-bit PCM: at most one step apart

    status, _, body = _post({"prompts": ["rain", "a dog barks"], "seed": 7, **STEPS})
    clips = json.loads(body)["clips"]
    import base64

    second = _int16(base64.b64decode(clips[1]["wav_base64"]))
    reference = _as_wav_int16(local_pipe.generate(["rain", "a dog barks"], seed=7, **STEPS).audio[1])
    assert status == 200 and np.abs(second.astype(np.int32) - reference).max() <= 1


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "invalid JSON body"),
    ({"prompt": "  "}, 400, "prompt #1 is empty"),
    ({"prompts": []}, 400, "non-empty list"),
    ({"prompt": "x", "prompts": ["y"]}, 400, "exactly one of"),
    ({"prompt": "x", "volume": 3}, 400, "unknown field(s) volume"),
    ({"prompt": "x", "steps": "many"}, 400, "\"steps\" must be an integer"),
    ({"prompt": "x", "duration": 7}, 422, "duration 7.0: is not an exported bucket"),
    ({"prompt": "x", "steps": 0}, 422, "steps 0: must be at least 1"),
    ({"prompt": "x", "vocoder_steps": 999}, 422, "vocoder_steps 999: this engine's tables hold at most 40 steps"),
    (b'{"prompt": "x", "steps": 4, "vocoder_steps": 3, "guidance": NaN}', 422, "guidance nan: must be a finite number"),
    ({"prompt": "x", "seed": -1}, 422, "seed -1: must be from 0 to 2**64 - 1"),
    ({"prompt": "x" * (1 << 20)}, 413, "exceeds the limit of 1048576 bytes"),
])
def test_bad_requests_get_their_status_and_message(server, body, status, message):
    if isinstance(body, dict):  # valid step counts (the engine's defaults exceed the demo's tables) unless tested
        body = {**STEPS, **body}
    code, _, text = _post(body)
    assert code == status, text
    assert message in json.loads(text)["error"]


def test_nan_fails_that_request_only_and_the_replica_stays_up(server):
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_post, {"prompt": "POISON", **STEPS})
        good = pool.submit(_post, {"prompt": "rain", **STEPS})
        (bad_status, _, bad_body), (good_status, _, _) = bad.result(), good.result()
    assert bad_status == 500 and "non-finite values (NaN/Inf) in dit_step at step 0" in json.loads(bad_body)["error"]
    assert good_status == 200
    assert _post({"prompt": "rain again", **STEPS})[0] == 200


def test_load_loses_nothing_and_forms_batches(server):
    """64 requests from 16 concurrent clients on the loopback, bounded in time."""
    started = time.monotonic()

    def client(k: int) -> tuple[int, int]:
        status, headers, body = _post({"prompt": f"request {k}", "seed": k, **STEPS}, timeout=120)
        assert len(_int16(body)) == 24000
        return status, int(headers["x-semvoc-batch-size"])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(64), timeout=240))
    assert [status for status, _ in results] == [200] * 64
    assert max(size for _, size in results) == 2  # the demo engine's largest bucket
    assert sum(size > 1 for _, size in results) >= 32
    assert time.monotonic() - started < 240


def test_metrics_reach_prometheus(server):
    """semvoc's own series on the Ray metrics endpoint (Prometheus text) of the replica's node."""
    urls = [f"http://127.0.0.1:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
            if n["Alive"] and n.get("MetricsExportPort")]
    text, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline and "ray_semvoc_batch_size_bucket" not in text:
        text = ""
        for url in urls:  # the nodes of this machine: one endpoint each
            with urllib.request.urlopen(url, timeout=10) as response:
                text += response.read().decode()
        time.sleep(1)
    for series in ("ray_semvoc_batch_size_bucket", "ray_semvoc_stage_seconds_bucket", "ray_semvoc_queue_depth",
                   "ray_semvoc_requests_total", 'stage="dit"'):
        assert series in text, series


def test_full_queue_answers_503_with_retry_after(cluster, demo_engine):
    _deploy(demo_engine, max_batch=1, max_ongoing=1, max_queued=1, retry_after_s=2.0)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: _post({"prompt": f"slow {k}", "steps": 30, "vocoder_steps": 30}),
                                range(8), timeout=240))
    statuses = [status for status, _, _ in results]
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}
    assert all(headers.get("retry-after") == "2" for status, headers, _ in results if status == 503)


def test_shutdown_drains_requests_in_flight(cluster, demo_engine):
    from ray import serve

    _deploy(demo_engine, max_batch=2, batch_wait_ms=10.0)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_post, {"prompt": f"drain {k}", "steps": 30, "vocoder_steps": 30}) for k in range(2)]
        time.sleep(1.0)  # both are in the replica now
        serve.delete("semvoc")
        assert [f.result(timeout=120)[0] for f in futures] == [200, 200]


# ----------------------------------------------------------------------------- offline (Ray Data)
def _prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"caption": f"sound number {i}", "audio_id": f"clip{i:02d}"}) + "\n"
                            for i in range(n)))
    return path


def _job(engine, prompts, out, *extra) -> list[str]:
    return ["--engine", str(engine), "--prompts", str(prompts), "--out-dir", str(out), "--steps", "6",
            "--vocoder-steps", "6", "--batch-size", "2", "--quiet", "--backend", "onnxruntime-cpu",
            "--threads", "1", *extra]


def _same_audio(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.wav"))
    assert names == sorted(p.name for p in b.glob("*.wav"))
    for name in names:
        x, y = sf.read(a / name, dtype="int16")[0], sf.read(b / name, dtype="int16")[0]
        assert x.shape == y.shape and np.abs(x.astype(np.int32) - y).max() <= 1, name


def _complete(out: Path, n: int) -> None:
    assert sorted(p.name for p in out.glob("*.wav")) == [f"clip{i:02d}.wav" for i in range(n)]
    assert sorted(p.name for p in out.glob("*.json")) == [f"clip{i:02d}.wav.json" for i in range(n)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    for i in range(n):
        assert sf.info(str(out / f"clip{i:02d}.wav")).frames == 24000


def test_offline_two_nodes_equals_single_process(cluster, demo_engine, tmp_path, capsys, monkeypatch):
    import ray.data
    from ray import serve

    serve.shutdown()  # free the CPU slots for the pool
    # start only when both actors (one per node: each node has one CPU) are up, so both get work
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    prompts = _prompts_file(tmp_path, 6)
    assert run_main(_job(demo_engine, prompts, tmp_path / "local")) == 0
    capsys.readouterr()
    assert run_main(_job(demo_engine, prompts, tmp_path / "ray", "--ray", cluster.address)) == 0
    err = capsys.readouterr().err
    assert "2 worker process(es) on 2 node(s)" in err, err
    _complete(tmp_path / "ray", 6)
    _same_audio(tmp_path / "local", tmp_path / "ray")
    assert run_main(_job(demo_engine, prompts, tmp_path / "ray", "--ray", cluster.address)) == 0
    assert "skipping 6 existing" in capsys.readouterr().err  # the resume rule of the single-process run


def _pool_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::MapWorker(MapBatches(ClipWriter))"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_offline_survives_a_killed_worker(cluster, demo_engine, tmp_path, capsys):
    from ray import serve

    serve.shutdown()
    n = 16  # enough work left after the first wav for the kill to land mid-run on a fast machine
    prompts = _prompts_file(tmp_path, n)
    out = tmp_path / "ray"
    result = {}
    job = threading.Thread(target=lambda: result.setdefault(
        "code", run_main(_job(demo_engine, prompts, out, "--ray", cluster.address))))
    job.start()
    killed, deadline = None, time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and job.is_alive():
        pids = _pool_pids()
        if pids and out.exists() and list(out.glob("*.wav")):  # mid-run: some clips written
            written = len(list(out.glob("*.wav")))
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None and written < n, "the job ended before a worker could be killed"
    assert not job.is_alive() and result["code"] == 0, capsys.readouterr().err
    _complete(out, n)
    assert run_main(_job(demo_engine, prompts, tmp_path / "local")) == 0
    _same_audio(tmp_path / "local", out)
