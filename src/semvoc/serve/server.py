"""``semvoc-serve``: an HTTP text-to-audio endpoint on Ray Serve.

    semvoc-serve --engine engines/demo                     # a local Ray instance, 127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/generate -d '{"prompt": "a dog barks", "seed": 1}' -o dog.wav

API
  POST /v1/generate  JSON {prompt | prompts, seed, steps, vocoder_steps, guidance, duration}
                     one ``prompt``: ``audio/wav`` (headers X-Semvoc-Batch-Size, X-Semvoc-Timings);
                     ``prompts``: JSON {sample_rate, clips: [{prompt, wav_base64, batch_size, timings}]}.
                     Prompt ``j`` of a request draws its noise from ``(seed, j)``, as in semvoc-run, so
                     the audio equals ``Pipeline.generate`` for the same seed whatever the batching.
  GET  /healthz      200 once the replica has loaded and warmed up its engine.
  Errors             400 malformed JSON or fields, 413 body too large, 422 values the engine cannot
                     run (same messages as semvoc-run), 503 + Retry-After when the queue is full,
                     500 naming the graph and step when a loop produced NaN/Inf (that request only).

Each replica holds one ``Pipeline`` (one per GPU; one CPU replica without GPUs). Requests are
batched by Ray Serve's ``@serve.batch`` up to the engine's largest batch bucket, waiting at most
``--batch-wait-ms`` for a batch to fill; within a batch, requests with the same settings run as one
``generate`` call. The queue is bounded by ``max_ongoing_requests`` per replica and
``max_queued_requests`` per proxy; past it the proxy answers 503 with Retry-After. Shutdown
(Ctrl-C, SIGTERM) drains: requests in flight finish before replicas stop.

Metrics (Prometheus text, on each node's Ray metrics port, ``--metrics-port``): Ray Serve's own
``ray_serve_*`` series plus ``ray_semvoc_queue_depth`` (requests waiting for a batch in a replica),
``ray_semvoc_batch_size`` (histogram of batches formed), ``ray_semvoc_stage_seconds{stage=queue|
text|dit|vocoder|total}`` and ``ray_semvoc_requests_total{status}``.
"""


import argparse
import asyncio
import base64
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semvoc.runtime import jobs

FIELDS = ("prompt", "prompts", "seed", "steps", "vocoder_steps", "guidance", "duration")
MAX_BODY = 1 << 20
MAX_PROMPTS = 64


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_generate(body: bytes, manifest, *, max_body: int = MAX_BODY,
                   max_prompts: int = MAX_PROMPTS) -> tuple[list[str], jobs.Request, bool]:
    """A ``/v1/generate`` body -> (prompts, resolved request, single-prompt form). Raises
    ``HTTPError`` with the status and the message semvoc-run would give."""
    if len(body) > max_body:
        raise HTTPError(413, f"request body of {len(body)} bytes exceeds the limit of {max_body} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise HTTPError(400, f"invalid JSON body ({err}); send an object such as "
                             '{"prompt": "a dog barks", "seed": 0}') from err
    if not isinstance(data, dict):
        raise HTTPError(400, "the JSON body must be an object with \"prompt\" or \"prompts\"")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    if ("prompt" in data) == ("prompts" in data):
        raise HTTPError(400, "give exactly one of \"prompt\" (a string) or \"prompts\" (a list of strings)")
    single = "prompt" in data
    prompts = [data["prompt"]] if single else data["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise HTTPError(400, "\"prompts\" must be a non-empty list of strings")
    if len(prompts) > max_prompts:
        raise HTTPError(413, f"{len(prompts)} prompts exceed the limit of {max_prompts} per request")
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str):
            raise HTTPError(400, f"prompt #{number} must be a string")
        if not prompt.strip():
            raise HTTPError(400, f"prompt #{number} is empty: give a text description of the audio")
    for key, kinds in (("seed", int), ("steps", int), ("vocoder_steps", int), ("guidance", int | float),
                       ("duration", int | float)):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise HTTPError(400, f"\"{key}\" must be {'an integer' if kinds is int else 'a number'} (got {value!r})")
    try:
        request = jobs.resolve_request(manifest, seed=data.get("seed", 0), steps=data.get("steps"),
                                       vocoder_steps=data.get("vocoder_steps"), guidance=data.get("guidance"),
                                       duration=data.get("duration"))
    except Exception as err:  # EngineError / ValueError from the runtime's checks
        raise HTTPError(422, str(err)) from err
    return prompts, request, single


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV, as semvoc-run writes."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@dataclass
class Item:
    prompt: str
    index: int  # position in its request: noise from (seed, index)
    request: jobs.Request
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class Outcome:
    audio: np.ndarray | None = None
    error: str | None = None
    batch_size: int = 0
    timings: dict = field(default_factory=dict)


class Engine:
    """One Pipeline and the batch logic, free of Ray: the deployment wraps it."""

    def __init__(self, engine: str, backend: str = "auto", threads: int | None = None, verify: bool = True,
                 warm_up: bool = True):
        from semvoc.runtime.pipeline import Pipeline

        self.pipe = Pipeline(engine, backend, verify=verify, threads=threads)
        self.manifest = self.pipe.manifest
        self.sample_rate = self.pipe.sample_rate
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """One short generation per batch bucket and duration: sessions built, CUDA graphs captured."""
        buckets = self.manifest.buckets
        sizes = buckets["batch_sizes"] if self.pipe.backend.pads_batches else [1]
        for duration in buckets["durations_s"]:
            for size in sizes:
                self.pipe.generate(["warm-up"] * size, steps=2, vocoder_steps=2, duration=duration)

    def run(self, items: list[Item]) -> list[Outcome]:
        """Items with equal settings share one ``generate`` call; noise is drawn per item from
        ``(seed, index)``. A non-finite loop fails only the items that produce it: the group is
        retried one item at a time to find them."""
        from semvoc.runtime.backends.base import NonFiniteError
        from semvoc.runtime.noise import batch_noise

        outcomes: list[Outcome | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for position, item in enumerate(items):
            r = item.request
            groups.setdefault((r.steps, r.vocoder_steps, r.guidance, r.duration), []).append(position)
        channels = self.manifest.shapes["latent_channels"]
        for (steps, vocoder_steps, guidance, duration), members in groups.items():
            frames = self.manifest.frames(duration)
            samples = frames * self.manifest.shapes["samples_per_frame"]

            def generate(positions, steps=steps, vocoder_steps=vocoder_steps, guidance=guidance,
                         duration=duration, frames=frames, samples=samples):
                noise = [batch_noise(items[p].request.seed, [items[p].index], (channels, frames), samples)
                         for p in positions]
                return self.pipe.generate([items[p].prompt for p in positions], steps=steps,
                                          vocoder_steps=vocoder_steps, guidance=guidance, duration=duration,
                                          latent_noise=np.concatenate([n[0] for n in noise]),
                                          audio_noise=np.concatenate([n[1] for n in noise]))

            try:
                attempts = [(members, generate(members))]
            except NonFiniteError:
                attempts = []
                for p in members:
                    try:
                        attempts.append(([p], generate([p])))
                    except NonFiniteError as err:
                        outcomes[p] = Outcome(error=str(err), batch_size=1)
            for positions, result in attempts:
                for row, p in enumerate(positions):
                    outcomes[p] = Outcome(result.audio[row], batch_size=len(positions), timings=dict(result.timings))
        return outcomes  # type: ignore[return-value]


def build_app(engine: str, *, backend: str = "auto", threads: int | None = None, verify: bool = True,
              replicas: int | None = None, max_batch: int | None = None, batch_wait_ms: float = 50.0,
              max_ongoing: int | None = None, max_queued: int = 64, retry_after_s: float = 1.0,
              drain_timeout_s: float = 60.0, max_body: int = MAX_BODY, max_prompts: int = MAX_PROMPTS,
              engine_cls: type = Engine):
    """The Ray Serve application (call with Ray connected: the replica count and the resources
    come from the cluster). ``engine_cls`` builds each replica's engine (an ``Engine`` subclass)."""
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from ray import serve
    from ray.serve.config import BackpressureConfig
    from ray.util import metrics

    from semvoc.runtime.manifest import load_manifest

    manifest = load_manifest(engine, verify=verify)
    largest = max(manifest.buckets["batch_sizes"])
    max_batch = min(max_batch or largest, largest)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    replicas = replicas or max(1, gpus)
    actor_options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    app = FastAPI(title="semvoc-serve")

    @serve.deployment(num_replicas=replicas, ray_actor_options=actor_options,
                      max_ongoing_requests=max_ongoing or 2 * max_batch, max_queued_requests=max_queued,
                      backpressure_config=BackpressureConfig(status_code=503, retry_after_s=retry_after_s),
                      graceful_shutdown_timeout_s=drain_timeout_s, graceful_shutdown_wait_loop_s=0.5,
                      health_check_period_s=10.0)
    @serve.ingress(app)
    class SemvocServer:
        def __init__(self):
            self.engine = engine_cls(engine, backend, threads, verify)
            self.batched.set_max_batch_size(max_batch)
            self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
            self.waiting = 0
            self.queue_depth = metrics.Gauge("semvoc_queue_depth", "requests waiting for a batch in this replica")
            self.batch_sizes = metrics.Histogram("semvoc_batch_size", "prompts per batch formed",
                                                 boundaries=[1, 2, 4, 8, 16, 32, 64])
            self.stage_seconds = metrics.Histogram(
                "semvoc_stage_seconds", "seconds per stage of a request", tag_keys=("stage",),
                boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120])
            self.requests = metrics.Counter("semvoc_requests_total", "requests answered", tag_keys=("status",))

        def _answer(self, status: int, message: str):
            self.requests.inc(tags={"status": str(status)})
            return JSONResponse({"error": message}, status_code=status)

        @app.get("/healthz")
        def healthz(self) -> dict:
            return {"status": "ok", "engine": str(engine), "backend": self.engine.pipe.backend.describe(),
                    "max_batch": max_batch}

        @app.post("/v1/generate")
        async def generate(self, http: Request):
            length = http.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_body:
                return self._answer(413, f"request body of {length} bytes exceeds the limit of {max_body} bytes")
            try:
                prompts, request, single = parse_generate(await http.body(), self.engine.manifest,
                                                          max_body=max_body, max_prompts=max_prompts)
            except HTTPError as err:
                return self._answer(err.status, err.message)
            self.waiting += len(prompts)
            self.queue_depth.set(self.waiting)
            outcomes = await asyncio.gather(*(self.batched(Item(p, j, request)) for j, p in enumerate(prompts)))
            failed = [o.error for o in outcomes if o.error]
            if failed:
                return self._answer(500, failed[0])
            self.requests.inc(tags={"status": "200"})
            rate = self.engine.sample_rate
            if single:
                o = outcomes[0]
                return Response(wav_bytes(o.audio, rate), media_type="audio/wav",
                                headers={"X-Semvoc-Batch-Size": str(o.batch_size),
                                         "X-Semvoc-Timings": json.dumps(o.timings)})
            return JSONResponse({"sample_rate": rate, "clips": [
                {"prompt": p, "wav_base64": base64.b64encode(wav_bytes(o.audio, rate)).decode("ascii"),
                 "batch_size": o.batch_size, "timings": o.timings} for p, o in zip(prompts, outcomes, strict=True)]})

        @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # set from the options in __init__
        async def batched(self, items: list[Item]) -> list[Outcome]:
            self.waiting -= len(items)
            self.queue_depth.set(self.waiting)
            started = time.perf_counter()
            for item in items:
                self.stage_seconds.observe(started - item.queued, tags={"stage": "queue"})
            self.batch_sizes.observe(len(items))
            # the engine runs in a thread so that the next batch can queue meanwhile
            outcomes = await asyncio.to_thread(self.engine.run, items)
            for o in outcomes:
                for stage, seconds in o.timings.items():
                    self.stage_seconds.observe(seconds, tags={"stage": stage})
                o.timings["queue"] = started - items[0].queued
            return outcomes

    return SemvocServer.bind()


def build_parser() -> argparse.ArgumentParser:
    from semvoc.runtime.select import BACKENDS

    p = argparse.ArgumentParser(prog="semvoc-serve", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="An HTTP text-to-audio endpoint on Ray Serve, for a semvoc engine.",
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--engine", type=Path, required=True, metavar="DIR", help="engine directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", metavar="ADDRESS",
                   help="join the Ray cluster at ADDRESS (e.g. 10.0.0.1:6379 or auto); default: start a local Ray")
    p.add_argument("--replicas", type=int, help="replicas (default: one per GPU in the cluster, else one on the CPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="runtime backend of each replica")
    p.add_argument("--threads", type=int, help="onnxruntime CPU threads per CPU replica (default: all cores)")
    p.add_argument("--max-batch", type=int, help="largest batch formed (default and bound: the largest bucket)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long a batch waits to fill before it runs (default 50)")
    p.add_argument("--max-ongoing", type=int, help="requests in a replica at once (default 2 x --max-batch)")
    p.add_argument("--max-queued", type=int, default=64,
                   help="requests queued per proxy before 503 + Retry-After (default 64)")
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds of a 503 (default 1)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds a stopping replica gives requests in flight (default 60)")
    p.add_argument("--max-body", type=int, default=MAX_BODY, help=f"largest request body in bytes (default {MAX_BODY})")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="Prometheus metrics port of a Ray started here (default 8080): "
                        "curl 127.0.0.1:8080/metrics | grep -E 'ray_semvoc|ray_serve'")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of engine files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("replicas", "max_batch", "max_ongoing", "max_queued", "max_body"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"semvoc-serve: error: --{name.replace('_', '-')} must be >= 1 (got {value})", file=sys.stderr)
            return 2
    if not 0 <= args.batch_wait_ms < 60_000 or not math.isfinite(args.batch_wait_ms):
        print("semvoc-serve: error: --batch-wait-ms must be between 0 and 60000", file=sys.stderr)
        return 2
    from semvoc.runtime.manifest import EngineError, load_manifest

    try:
        load_manifest(args.engine, verify=not args.no_verify)
    except EngineError as err:
        print(f"semvoc-serve: error: {err}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError as err:
        print(f"semvoc-serve: error: needs Ray: pip install 'semvoc[serve]' ({err})", file=sys.stderr)
        return 2

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # semvoc reports nothing to anyone
    try:
        if args.address:
            from semvoc.serve.offline import check_reachable

            check_reachable(args.address)
            ray.init(address=args.address, logging_level="WARNING")
        else:
            ray.init(logging_level="WARNING", _metrics_export_port=args.metrics_port)
    except (ConnectionError, RuntimeError, ValueError) as err:  # Ray's own exceptions derive from these
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"semvoc-serve: error: cannot start or join Ray ({cause}); check --address, and for a cluster "
              "with token authentication set RAY_AUTH_MODE=token and its token (see Ray's token-auth docs)",
              file=sys.stderr)
        return 2
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(str(args.engine.resolve()), backend=args.backend, threads=args.threads,
                        verify=not args.no_verify, replicas=args.replicas, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, max_ongoing=args.max_ongoing,
                        max_queued=args.max_queued, retry_after_s=args.retry_after,
                        drain_timeout_s=args.drain_timeout, max_body=args.max_body)
        serve.run(app, name="semvoc", route_prefix="/", blocking=False)
        print(f"semvoc-serve: ready on http://{args.host}:{args.port} (POST /v1/generate, GET /healthz); "
              "Ctrl-C drains and stops", file=sys.stderr)
        while not stop["flag"]:
            time.sleep(0.5)
        print("semvoc-serve: draining requests in flight, then stopping", file=sys.stderr)
    finally:
        serve.shutdown()  # replicas finish what they hold (up to --drain-timeout), then stop
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
