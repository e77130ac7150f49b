"""``semvoc-run --prompts FILE --out-dir DIR --ray [ADDRESS]``: the prompts job on Ray Data.

The driver plans the job exactly as the single-process run does (``semvoc.runtime.jobs``: names,
duplicate and stale-file checks, resume rule) and hands Ray Data only the prompts left to do. An
actor pool holds one ``Pipeline`` per GPU (or per CPU worker); ``map_batches`` feeds each actor
batches of at most the engine's largest bucket; each actor generates with ``(seed, index)`` noise
and writes every clip atomically with its provenance record, exactly as ``semvoc-run`` does. So
the wavs have the same names and the same audio as a single-process run.

A worker process or node that dies mid-run loses nothing: Ray restarts the actor and retries its
batch (bounded: ``RETRIES`` times), and rewriting a clip is idempotent (same record, atomic
rename). At the end the driver checks that every prompt has a complete wav with a matching record.
``DIR`` must be one filesystem that every node sees (a local disk on one machine, NFS or similar
on a cluster).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

from semvoc.runtime import jobs

RETRIES = 4  # actor restarts and batch retries per actor: a crash that repeats ends the run


class ClipWriter:
    """A Ray Data actor: one Pipeline, batches of prompts in, wavs + records on disk out."""

    def __init__(self, engine: str, backend: str, threads: int | None, verify: bool, request: dict,
                 engine_id: str):
        from semvoc.runtime.pipeline import Pipeline

        self.pipe = Pipeline(engine, backend, verify=verify, threads=threads)
        self.request = jobs.Request(**request)
        self.engine_id = engine_id

    def __call__(self, batch: dict) -> dict:
        import ray

        clips = [jobs.Clip(int(i), str(c), str(a) or None, Path(str(p)))
                 for i, c, a, p in zip(batch["index"], batch["caption"], batch["audio_id"], batch["path"],
                                       strict=True)]
        started = time.perf_counter()
        paths, seconds = jobs.generate_clips(self.pipe, clips, self.request, self.engine_id)
        wall = time.perf_counter() - started
        return {"path": [str(p) for p in paths], "batch": [len(clips)] * len(clips),
                "seconds": [seconds / len(clips)] * len(clips), "wall": [wall] * len(clips),
                "node": [ray.get_runtime_context().get_node_id()] * len(clips), "pid": [os.getpid()] * len(clips)}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast for a HOST:PORT nothing listens on (Ray itself retries for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {address} ({err.strerror or err}); start the head with "
                              "`ray start --head` or give its address") from err


def connect(address: str | None, quiet: bool = False) -> bool:
    """Join the cluster at ``address`` ("auto": a running local one, else start one). Returns
    whether this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # semvoc reports nothing to anyone
    kwargs = {"log_to_driver": not quiet, "logging_level": "WARNING"}
    if address in (None, "auto", "local"):
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            ray.init(**kwargs)  # no cluster running: a local instance for this run
    else:
        check_reachable(address)
        ray.init(address=address, **kwargs)
    return True


def pool_shape(workers: int | None, threads: int | None) -> tuple[int, dict]:
    """(actors, resources per actor): one per GPU when the cluster has GPUs, else one per
    ``threads`` CPUs (default 1 thread each: onnxruntime's own threads would oversubscribe)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (workers or gpus), {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    per = max(1, threads or 1)
    return (workers or max(1, cpus // per)), {"num_cpus": per}


def run_plan(engine: Path, plan: jobs.Plan, request: jobs.Request, engine_id: str, size: int, *,
             backend: str = "auto", threads: int | None = None, workers: int | None = None,
             verify: bool = True, progress=None) -> list[dict]:
    """Generate ``plan.todo`` on the connected Ray cluster; returns one row per written clip."""
    import dataclasses

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows one bar in clips
    actors, resources = pool_shape(workers, threads)
    actors = min(actors, max(1, -(-len(plan.todo) // size)))  # no idle actors for a short list
    rows = [{"index": c.index, "caption": c.caption, "audio_id": c.audio_id or "", "path": str(c.path)}
            for c in plan.todo]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // size)))
    threads_per_actor = resources.get("num_cpus") if "num_gpus" not in resources else threads
    with warnings.catch_warnings():  # bounded retries have no named map_batches parameter yet
        warnings.simplefilter("ignore", DeprecationWarning)
        written = dataset.map_batches(
            ClipWriter, batch_size=size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"engine": str(Path(engine).resolve()), "backend": backend,
                                   "threads": threads_per_actor, "verify": verify,
                                   "request": dataclasses.asdict(request), "engine_id": engine_id},
            max_restarts=RETRIES, max_task_retries=RETRIES, **resources)
    done = []
    for row in written.iter_rows():
        done.append(row)
        if progress:
            progress(row)
    return done


def run_job(args, items: list[tuple[str, str | None]]) -> int:
    """The ``--ray`` branch of ``semvoc-run``: plan, run on the cluster, verify. Returns the exit code."""
    import ray
    from tqdm import tqdm

    from semvoc.runtime.manifest import load_manifest

    if args.ray_workers is not None and args.ray_workers < 1:
        raise ValueError(f"--ray-workers must be >= 1 (got {args.ray_workers})")
    manifest = load_manifest(args.engine, verify=not args.no_verify)
    request = jobs.resolve_request(manifest, seed=args.seed, steps=args.steps, vocoder_steps=args.vocoder_steps,
                                   guidance=args.guidance, duration=args.duration)
    size = jobs.chunk_size(args.batch_size, manifest.buckets["batch_sizes"], len(items))
    engine_id = jobs.engine_identity(manifest)
    plan = jobs.plan_outputs(items, request, engine_id, out_dir=args.out_dir, overwrite=args.overwrite)
    for note in plan.notes():
        print(f"semvoc-run: {note}", file=sys.stderr)
    if not plan.todo:
        return 0
    try:
        started_ray = connect(args.ray, quiet=args.quiet)
    except (ConnectionError, RuntimeError) as err:
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"--ray {args.ray}: cannot start or join Ray ({cause}); for a cluster with token "
                         "authentication set RAY_AUTH_MODE=token and its token") from err
    started = time.perf_counter()
    bar = tqdm(total=len(plan.todo), unit="clip", disable=args.quiet, file=sys.stderr)
    try:
        rows = run_plan(args.engine, plan, request, engine_id, size, backend=args.backend, threads=args.threads,
                        workers=args.ray_workers, verify=not args.no_verify, progress=lambda _row: bar.update(1))
    except Exception as err:  # a task error arrives wrapped by Ray: its last line names the cause
        bar.close()
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"semvoc-run: error: the Ray job failed: {cause}", file=sys.stderr)
        return 1
    finally:
        if started_ray:
            ray.shutdown()
    bar.close()
    wall = time.perf_counter() - started
    missing = jobs.incomplete(plan.todo, request, engine_id)
    if missing:
        print(f"semvoc-run: error: {len(missing)} clip(s) missing after the Ray job, e.g. {missing[0].path}; "
              "run the same command again to finish them", file=sys.stderr)
        return 1
    # a worker killed mid-write (its task retried elsewhere) leaves its temporary file behind
    jobs.remove_orphan_temps(plan.todo)
    seconds = sum(r["seconds"] for r in rows)
    nodes = len({r["node"] for r in rows})
    workers = len({(r["node"], r["pid"]) for r in rows})
    print(f"semvoc-run: {len(plan.todo)} clip(s), {seconds:.1f} s of audio in {wall:.2f} s wall on Ray "
          f"({workers} worker process(es) on {nodes} node(s)); {len(plan.todo) / wall:.2f} clips/s",
          file=sys.stderr)
    return 0
