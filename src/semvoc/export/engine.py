"""Writes an engine directory: graphs, tokenizer, parity report and manifest, atomically.

Everything is written into a temporary sibling directory and renamed into place at the end,
so an interrupted or failed export never leaves a half-made engine at ``--out``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from semvoc import __version__
from semvoc.export import onnx_export, step_parts
from semvoc.export.fused_dit import supports_fused
from semvoc.export.graphs import Dims, GraphSpec, graph_specs, resolve_shape
from semvoc.export.parity import BOUNDS, check_graph, relative_error
from semvoc.export.precision import (
    CALIBRATION_CAPTIONS,
    cast_for_plan,
    measure_activations,
    plan_precision,
)
from semvoc.export.samples import pipeline_feeds
from semvoc.export.tokenizer import convert_t5_tokenizer, demo_tokenizer_path
from semvoc.kernels import cuda_build
from semvoc.kernels.onnx_ops import fusion_enabled
from semvoc.models.config import ModelConfig
from semvoc.models.model import SemanticVocoderModel, parameter_counts
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, cuda_available, make_session, note_cuda_ops_exported
from semvoc.runtime.manifest import MANIFEST, SCHEMA_VERSION, hash_and_stamp, remember_verified
from semvoc.runtime.tokenizer import TextTokenizer

COMPONENTS = ("text", "dit", "vocoder", "semantic")


class ExportError(RuntimeError):
    """An export that cannot proceed; the message says what to change."""


@dataclass
class ExportOptions:
    out: Path
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    durations: tuple[float, ...] = (10.0,)
    max_text_tokens: int = 128
    components: tuple[str, ...] = COMPONENTS
    tokenizer: Path | None = None
    max_dit_steps: int = 250
    max_vocoder_steps: int = 400
    parity_steps: int = 3
    allow_parity_failure: bool = False
    force: bool = False
    trt: bool = False
    calibrate: bool = True
    device: str = "cpu"
    verbose: bool = False
    dit_form: str = "auto"  # "auto" | "fused" | "generic" (see export.fused_dit)
    cuda_kernels: bool = False  # semvoc's CUDA ops (semvoc.kernels.cuda_build): the vocoder's blocks, and
    # the fused DiT's (cuda_dit_kernels: None = where they cover the DiT, True = required, False = not)
    cuda_dit_kernels: bool | None = None
    cuda_kernels_auto: bool = False  # use them where they can be built (cuda_kernels then says whether they were)
    ort_include: Path | None = None  # an official onnxruntime include/ to build them against (optional)
    cuda_arch: str = cuda_build.DEFAULT_ARCH
    fp32_islands: bool = True  # fp16 graphs that miss parity: fp32 islands per node before fp32 whole


@dataclass
class ModelSource:
    model: SemanticVocoderModel
    description: str  # "preset demo (seed 0)" or the checkpoint path
    untrained: bool
    extra: dict = field(default_factory=dict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _lock_file(parent: Path, name: str, pid: int) -> Path:
    return parent / f".{name}.export-{pid}.lock"


@contextlib.contextmanager
def _export_lock(out: Path):
    """An exclusive ``flock`` on ``.<out>.export-<pid>.lock`` for the export's lifetime. The kernel
    drops it when the process ends, however it ends (kill -9 included), so a later export can
    tell a partial folder of a dead export from one still being written."""
    out = out.resolve()
    lock = _lock_file(out.parent, out.name, os.getpid())
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as err:
        raise ExportError(f"cannot write to {out.parent} ({err.strerror}); choose a writable --out") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": platform.node(), "out": str(out),
                                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}).encode())
        yield
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _owner_alive(parent: Path, name: str, pid: int) -> bool | None:
    """Whether the export that made a partial folder still runs: True, False, or None (unknown)."""
    lock = _lock_file(parent, name, pid)
    if lock.exists():
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # its owner just finished
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
    try:  # no lock file (a folder from an older semvoc): fall back on the pid
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return None  # a live process has this pid: the export, or another process that reused the pid


def _folder_size(path: Path) -> str:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"


def clean_stale_exports(out: Path) -> None:
    """Deal with the hidden folders an export killed hard leaves beside ``out``.

    ``.<out>.partial-<pid>`` (an engine being built) is removed once its process is gone;
    ``.<out>.old-<pid>`` (the previous engine, set aside while the new one was moved in) is
    removed too, or moved back to ``out`` if the kill came before the new engine took its place.
    A folder of an export that still runs is left alone, and a second export to the same
    ``out`` is refused while one runs.
    """
    out = out.resolve()
    parent = out.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    for path in sorted(parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        alive = _owner_alive(parent, out.name, pid)
        if alive:
            raise ExportError(f"another export to {out} is running (process {pid}, writing {path}); wait for it "
                              "to finish or choose another --out")
        if alive is None:
            _log(f"note: {path} may belong to an export still running (process {pid} exists); left alone. "
                 "Remove it by hand if no export to this --out is running.")
            continue
        if kind == "old" and not out.exists():
            path.rename(out)
            _log(f"restored the previous engine at {out} from {path.name}: an export (process {pid}) was "
                 "killed while replacing it")
        else:
            size = _folder_size(path)
            shutil.rmtree(path)
            _log(f"removed {path} ({size}), left by an export (process {pid}) that was killed before it finished")
        _lock_file(parent, out.name, pid).unlink(missing_ok=True)


def check_out_dir(out: Path, force: bool) -> None:
    clean_stale_exports(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty; choose another directory or pass --force to "
                          "replace it (the old engine is kept until the new one is complete)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create {parent}: {err}") from err
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent}: permission denied; choose a writable --out")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"semvoc": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _graph_entries(spec: GraphSpec, dims: Dims, dtypes: dict[str, str], duration: float | None,
                   files: list[Path], root: Path) -> tuple[str, dict]:
    def resolve(t):
        dtype = dtypes[spec.component] if t.dtype == "compute" else t.dtype
        shape = list(t.shape)
        if duration is not None:  # static time axis: fold "frames"
            frames = round(duration * dims.frames_per_second)
            symbols = {"frames": frames, "samples16k": frames * dims.semantic_samples_per_frame}
            shape = [resolve_shape((s,), symbols)[0]
                     if isinstance(s, str) and ("frames" in s or s == "samples16k") else s for s in shape]
        return {"name": t.name, "dtype": dtype, "shape": shape}

    name = spec.name if duration is None else f"{spec.name}_{duration:g}s"
    entry = {"kind": spec.name, "component": spec.component, "file": files[0].relative_to(root).as_posix(),
             "data_file": files[1].relative_to(root).as_posix() if len(files) > 1 else None,
             "inputs": [resolve(t) for t in spec.inputs], "outputs": [resolve(t) for t in spec.outputs],
             "duration_s": duration, "loop": spec.loop, "notes": spec.notes}
    return name, entry


def _record_onnx_dims(entry: dict, path: Path) -> None:
    """Store each input's ONNX ``dim_param`` names beside the shape expressions: the runtime
    fixes those dims by name (onnxruntime free-dimension overrides) for CUDA-graph capture."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    for tensor in entry["inputs"]:
        tensor["onnx_dims"] = dims[tensor["name"]]


def _tokenizer(options: ExportOptions, tmp: Path, vocab_size: int) -> Path:
    target = tmp / "tokenizer.json"
    if options.tokenizer is not None:
        convert_t5_tokenizer(options.tokenizer, target)
    else:
        shutil.copyfile(demo_tokenizer_path(), target)
    tok = TextTokenizer(target, options.max_text_tokens)
    size = tok.tokenizer.get_vocab_size()
    if size > vocab_size:
        raise ExportError(f"the tokenizer has {size} tokens but the text encoder embeds {vocab_size}; "
                          "pass the tokenizer that belongs to the checkpoint with --tokenizer")
    return target


def export_engine(source: ModelSource, options: ExportOptions) -> Path:
    out = Path(options.out)
    check_out_dir(out, options.force)
    unknown = sorted(set(options.components) - set(COMPONENTS))
    if unknown:
        raise ExportError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    model = source.model.eval()
    if "semantic" in options.components and model.semantic_encoder is None:
        raise ExportError("this model has no semantic encoder (encoder_name='none'); "
                          "drop 'semantic' from --components")
    tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
    started = time.time()
    with _export_lock(out):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        stamps: dict[str, list[int] | None] = {}  # each file's stat as hashed for the manifest
        try:
            manifest = _export_into(tmp, source, options, stamps)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # the hashes just computed are a verification: the first load need not hash the files again
    remember_verified(out, manifest["files"], stamps)
    _log(f"engine written to {out} in {time.time() - started:.0f} s")
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.resolve().parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _export_into(tmp: Path, source: ModelSource, options: ExportOptions,
                 stamps: dict[str, list[int] | None]) -> dict:
    from tqdm import tqdm

    model = source.model
    device = torch.device(options.device)
    cfg = model.cfg
    provider = "cuda" if (device.type == "cuda" and cuda_available()) else "cpu"
    built = _cuda_kernels(tmp, options, provider, cfg)
    if built is not None:  # the parity checks below run the ops in this process
        note_cuda_ops_exported()
    options = dataclasses.replace(options, cuda_kernels=built is not None)
    custom_ops = built.path if built else None
    fused = _fused_dit(model, options)
    dit_cuda_ops = _dit_cuda_ops(model, options, fused)
    dims = Dims.of(model, options.max_text_tokens, options.max_dit_steps, options.max_vocoder_steps,
                   fused=fused, vocoder_channels_last=options.cuda_kernels, dit_cuda_ops=dit_cuda_ops)
    frames = [round(d * cfg.sampling.latent_frames_per_second) for d in options.durations]
    if any(f < 2 for f in frames):
        raise ExportError(f"durations {options.durations} are too short: at least 0.08 s (2 frames)")

    _log("[1/4] tokenizer")
    tokenizer_path = _tokenizer(options, tmp, model.text_encoder.model.config.vocab_size)

    _log("[2/4] precision: " + options.dtype + (" (calibrating activation ranges)"
                                                 if options.dtype == "float16" else ""))
    maxima = None
    if options.dtype == "float16" and options.calibrate:
        tok = TextTokenizer(tokenizer_path, options.max_text_tokens)
        batch = tok(CALIBRATION_CAPTIONS[:2], warn=False)
        maxima = measure_activations(model.to(device), batch.input_ids, batch.attention_mask,
                                     frames=min(frames))
    plan = plan_precision(options.dtype, maxima, islands=options.fp32_islands)
    for note in plan.notes:
        _log("  note: " + note)

    lowered = copy.deepcopy(model).cpu()
    lowered.vocoder.use_export_kernels(cuda_ops=options.cuda_kernels,
                                       float16=plan.components.get("vocoder", plan.dtype) == "float16",
                                       activation_maxima=maxima)
    graph_model = cast_for_plan(lowered, plan)  # traced on the CPU (fake tensors, no compute)
    reference = model.to(device)
    dtypes = plan.components

    specs = [s for s in graph_specs(dims) if s.component in options.components]
    jobs = [(s, d) for s in specs for d in (options.durations if s.per_duration else (None,))]
    graphs, parity = {}, {}
    trace_frames = min(frames) if min(frames) < 50 else 50
    _log(f"[3/4] exporting {len(jobs)} graph(s) to ONNX (opset {onnx_export.OPSET}) and checking "
         f"parity on onnxruntime-{provider}")
    bar = tqdm(total=len(jobs), unit="graph", file=sys.stderr, disable=None)
    for component in [c for c in COMPONENTS if any(s.component == c for s, _ in jobs)]:
        todo = [(s, d) for s, d in jobs if s.component == component]
        while True:  # a component whose fp16 graphs lose too much gets fp32 islands, else is redone in fp32
            results = [_export_one(spec, duration, tmp, graph_model, reference, model, dims, dtypes, options,
                                   provider, frames, trace_frames, custom_ops) for spec, duration in todo]
            if dtypes[component] == "float16" and options.fp32_islands:
                # calibration saw overflow: search even where parity passed (onnxruntime's CPU provider
                # computes many fp16 nodes in fp32, so CPU parity can miss what a GPU overflows on)
                overflow = bool(plan.overflow_sites.get(component))
                results = [_with_islands(spec, result, tmp, reference, dims, options, provider, plan, custom_ops)
                           if overflow or not result[2]["passed"] else result
                           for (spec, _), result in zip(todo, results, strict=True)]
            failed = [(name, p) for name, _, p in results if not p["passed"]]
            if failed and dtypes[component] != "float32" and plan.components.get(component) != "float32":
                name, p = failed[0]
                note = (f"{component}: {dtypes[component]} parity error {p['max_rel_error']:.3g} ({name}) exceeds "
                        f"the bound {p['bound']:g}: this component runs in fp32")
                _log("  note: " + note)
                plan.notes.append(note)
                plan.components[component] = "float32"
                for graph_name, _, _ in results:  # redone in fp32 whole: no islands
                    plan.islands.pop(graph_name, None)
                graph_model = cast_for_plan(lowered, plan)
                continue
            break
        for name, entry, p in results:
            graphs[name], parity[name] = entry, p
            bar.update(1)
            if not p["passed"]:
                message = (f"{name}: parity error {p['max_rel_error']:.3g} exceeds the "
                           f"{p['dtype']} bound {p['bound']:g}")
                if not options.allow_parity_failure:
                    raise ExportError(message + "; the graph does not match its PyTorch module "
                                      "(pass --allow-parity-failure to write it anyway)")
                _log("  WARNING: " + message)
    bar.close()
    for name, entry in graphs.items():  # indexed from the final files (fp32 islands rewrite a graph)
        # the step graphs and the text encoder: the runtime creates a session of each per batch bucket
        if (entry["loop"] or entry["kind"] == "text_encoder") and entry["data_file"]:
            symbols = {"batch": min(options.batch_sizes), "frames": frames[0], "dit_rows": dims.dit_rows,
                       "vocoder_rows": dims.vocoder_rows}
            entry["weights"] = _shared_weight_index(name, entry, tmp / entry["file"], provider, custom_ops, symbols)
            if entry["kind"] == "vocoder_step" and fusion_enabled(step_parts.FUSION):
                parts = _vocoder_step_parts(name, entry, tmp, provider, custom_ops, symbols, len(dims.branch_hops))
                if parts:
                    entry["parts"] = parts

    tensorrt = None
    if options.trt:
        from semvoc.export.trt import build_plans

        _log("[3b] building TensorRT plans")
        tensorrt = build_plans(tmp, graphs, options)

    _log("[4/4] writing parity.json and manifest.json")
    parity_report = {"provider": provider, "bounds": BOUNDS, "graphs": parity,
                     "all_passed": all(p["passed"] for p in parity.values()),
                     "fp32_islands": plan.islands}  # graph -> nodes kept in fp32 (details per graph)
    (tmp / "parity.json").write_text(json.dumps(parity_report, indent=1))
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp).as_posix()
            files[rel], stamps[rel] = hash_and_stamp(p)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "producer": _versions(),
        "model": {"source": source.description, "untrained": source.untrained,
                  "config": cfg.to_dict(), "parameters": parameter_counts(model), **source.extra},
        "precision": plan.to_dict(),
        "opset": onnx_export.OPSET,
        "dit_form": "fused" if dims.fused_dit else "generic",
        "buckets": {"batch_sizes": list(options.batch_sizes), "durations_s": list(options.durations),
                    "frames": frames, "text_tokens": options.max_text_tokens,
                    "max_dit_steps": options.max_dit_steps, "max_vocoder_steps": options.max_vocoder_steps,
                    "dit_rows": dims.dit_rows, "vocoder_rows": dims.vocoder_rows},
        "shapes": {"latent_channels": dims.latent_channels, "samples_per_frame": dims.samples_per_frame,
                   "frames_per_second": cfg.sampling.latent_frames_per_second,
                   "semantic_sample_rate": dims.semantic_samples_per_second,
                   "context_dim": dims.context_dim, "vocab_size": model.text_encoder.model.config.vocab_size},
        "defaults": {"steps": cfg.sampling.num_steps, "vocoder_steps": cfg.sampling.vocoder_steps,
                     "guidance": cfg.sampling.guidance_scale, "sway": cfg.sampling.sway_sampling_coef,
                     "noise_scale": cfg.vocoder.init_noise_scale, "sample_rate": cfg.sampling.sample_rate,
                     "clamp": cfg.sampling.clamp_pred, "pred_x1": cfg.vocoder.pred_x1},
        "tokenizer": "tokenizer.json",
        "graphs": graphs,
        "parity": {"file": "parity.json", "provider": provider, "all_passed": parity_report["all_passed"],
                   "max_rel_error": {k: v["max_rel_error"] for k, v in parity.items()}},
        "tensorrt": tensorrt,
        "custom_ops": None if custom_ops is None else {
            "library": custom_ops.relative_to(tmp).as_posix(), "domain": cuda_build.DOMAIN,
            "ops": list(cuda_build.OPS), "provider": "onnxruntime-cuda", "arch": options.cuda_arch,
            **built.manifest_entry(), "dit": dims.dit_cuda_ops},
        "files": files,
    }


def _input_dims(entry: dict) -> dict[str, object]:
    """A graph entry's named ONNX input dims -> their manifest expressions (``frames*960``, ...)."""
    return {dim: expression for t in entry["inputs"]
            for dim, expression in zip(t["onnx_dims"], t["shape"], strict=True) if isinstance(dim, str) and dim}


def _weights_kept_as_stored(path: Path, index: list[dict], provider: str, custom_ops: Path | None,
                            overrides: dict[str, int], data: str | None = None) -> list[dict]:
    """The entries of ``index`` that onnxruntime's optimizations on the export's provider still read
    as stored in ``path``'s graph, checked as the runtime creates its sessions: with one bucket's
    dims fixed (``overrides``: the captured loops) and without (the uncaptured diagnosis)."""
    kept = index
    for fixed in (overrides, None):
        def optimized_session(graph: Path, optimized: Path, fixed=fixed):
            return make_session(graph, provider, custom_ops=custom_ops, optimized_model=optimized, dim_overrides=fixed)

        kept = onnx_export.weights_used_as_stored(path, kept, optimized_session, data=data)
    return kept


def _shared_weight_index(name: str, entry: dict, path: Path, provider: str, custom_ops: Path | None,
                         symbols: dict[str, int]) -> list[dict]:
    """The manifest's index of the weights of a graph whose sessions are made per batch bucket (the step
    graphs, the text encoder) (``onnx_export.weight_index``), less those that onnxruntime's
    optimizations do not read as stored (``_weights_kept_as_stored``). The runtime gives the
    indexed weights to every session of the graph (``runtime.backends.shared_weights``)."""
    from semvoc.runtime.manifest import eval_dim

    index = onnx_export.weight_index(path)
    overrides = {dim: eval_dim(expression, symbols) for dim, expression in _input_dims(entry).items()}
    try:
        kept = _weights_kept_as_stored(path, index, provider, custom_ops, overrides)
    except Exception as err:  # cannot tell which weights are safe to share: share none of them
        detail = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        _log(f"  note: {name}: its weights are not indexed for sharing between batch buckets (onnxruntime "
             f"could not save the optimized graph: {detail})")
        return []
    if len(kept) < len(index):
        _log(f"  note: {name}: {len(index) - len(kept)} of {len(index)} weights are left to each session "
             f"(onnxruntime-{provider} rewrites or folds them when it optimizes the graph)")
    return kept


def _vocoder_step_parts(name: str, entry: dict, tmp: Path, provider: str, custom_ops: Path | None,
                        symbols: dict[str, int], branches: int) -> list[dict]:
    """The vocoder step cut into its branches and a tail (``step_parts``), for the CUDA backend to
    run the branches side by side; the manifest's ``parts`` entries, or [] (with a note) when the
    graph is not cut or the parts do not compute what the graph does. The parts and the graph run
    one step on the same random inputs on the export's provider; each part gets the graph's
    indexed weights that onnxruntime's optimizations leave as stored in it."""
    from semvoc.runtime.manifest import eval_dim

    path = tmp / entry["file"]
    groups = [[f"cond_bias_{i}", f"time_scale_{i}"] for i in range(branches)]
    dims = _input_dims(entry)
    written, why = step_parts.write_parts(path, groups, dims)
    if why:
        _log(f"  note: {name}: not cut into branches ({why}); its branches run one after another")
        return []
    overrides = {dim: eval_dim(expression, symbols) for dim, expression in dims.items()}
    rng = np.random.default_rng(0)
    feeds = {}
    for t in entry["inputs"]:
        shape = [eval_dim(d, symbols) for d in t["shape"]]
        if t["dtype"] == "int64":  # the step counter: a row inside the tables
            feeds[t["name"]] = np.ones(shape, np.int64)
        elif t["name"] == "t_span":  # times in [0, 1): the x1-prediction divides by 1 - t
            feeds[t["name"]] = np.linspace(0, 0.9, shape[0], dtype=np.float32)
        else:
            feeds[t["name"]] = rng.uniform(-1, 1, shape).astype(NUMPY_DTYPES[t["dtype"]])
    try:
        whole = make_session(path, provider, custom_ops=custom_ops, dim_overrides=overrides)
        expected = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds), strict=True))
        values = dict(feeds)
        for part in written:
            session = make_session(tmp / part["file"], provider, custom_ops=custom_ops, dim_overrides=overrides)
            names = [t["name"] for t in part["outputs"]]
            values.update(zip(names, session.run(names, {n: values[n] for n in part["inputs"]}), strict=True))
        error = max(relative_error(values[k].astype(np.float64), v.astype(np.float64)) for k, v in expected.items())
        # the same kernels on the same inputs: roundings at most (an algorithm another session chose)
        compute = next(t["dtype"] for t in entry["inputs"] if t["name"].startswith("time_scale_"))
        bound = BOUNDS[compute] / 10
        if not error <= bound:
            raise ExportError(f"its parts differ from it by {error:.3g} (bound {bound:g})")
        index = entry.get("weights") or []
        for part in written:
            used = set(part.pop("initializers"))
            kept = _weights_kept_as_stored(tmp / part["file"], [w for w in index if w["name"] in used], provider,
                                           custom_ops, overrides, data=entry["data_file"])
            part["weights"] = [w["name"] for w in kept]
    except Exception as err:
        for part in written:
            (tmp / part["file"]).unlink(missing_ok=True)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        _log(f"  note: {name}: not cut into branches ({detail}); its branches run one after another")
        return []
    return written


def _cuda_kernels_off_reason(options: ExportOptions, provider: str, model_cfg: ModelConfig) -> str | None:
    """Why this export cannot use semvoc's CUDA ops (None when it can)."""
    if options.trt:
        return "--trt: TensorRT does not run semvoc's onnxruntime custom ops"
    if provider != "cuda":
        return ("they run (and are parity-checked) on onnxruntime's CUDA execution provider only: export with "
                "--device cuda on a machine with onnxruntime-gpu")
    if options.dtype == "bfloat16":
        return "--bf16: the ops take float32 and float16"
    voc = model_cfg.vocoder
    reason = cuda_build.unsupported_reason(tuple(voc.channels), tuple(voc.conv_kernel_sizes))
    return f"they do not cover this model: {reason}" if reason else None


def _cuda_kernels(tmp: Path, options: ExportOptions, provider: str,
                  model_cfg: ModelConfig) -> cuda_build.BuiltLibrary | None:
    """Compile semvoc's CUDA op library into the engine (``kernels/``) when asked for, or, with
    ``--cuda-kernels auto``, when it can be built here; logs one line saying what was chosen and why."""
    if not options.cuda_kernels and not options.cuda_kernels_auto:
        _log("  semvoc's CUDA ops: off (not asked for: --no-cuda-kernels)")
        return None
    reason = _cuda_kernels_off_reason(options, provider, model_cfg)
    if reason is None:
        try:
            cuda_build.find_nvcc()
        except cuda_build.KernelBuildError as err:
            reason = str(err)
    if reason is None:
        _log(f"[2b] building semvoc's CUDA op library (nvcc, {options.cuda_arch})")
        try:
            built = cuda_build.build(tmp / "kernels", options.ort_include, options.cuda_arch, verbose=options.verbose)
        except cuda_build.KernelBuildError as err:
            if options.cuda_kernels:
                raise ExportError(f"--cuda-kernels: {err}") from err
            shutil.rmtree(tmp / "kernels", ignore_errors=True)
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            # the headline and nvcc's last word (the error itself), on the one log line
            reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1][:300]}"
        else:
            archs = "this GPU" if built.archs is None else ", ".join(f"sm_{a}" for a in built.archs) + (
                f" + PTX {built.ptx}" if built.ptx else "")
            _log(f"  semvoc's CUDA ops: on ({'--cuda-kernels' if options.cuda_kernels else 'auto'}; built for "
                 f"{archs} by CUDA {built.nvcc_version} nvcc in {built.seconds:.0f} s; --no-cuda-kernels to opt out)")
            return built
    if options.cuda_kernels:
        raise ExportError(f"--cuda-kernels: {reason}; export without --cuda-kernels")
    _log(f"  semvoc's CUDA ops: off ({reason})")
    return None


def _dit_cuda_ops(model: SemanticVocoderModel, options: ExportOptions, fused: bool) -> bool:
    """Whether the DiT step runs semvoc's CUDA ops: with --cuda-kernels, where they cover the DiT."""
    if not options.cuda_kernels or options.cuda_dit_kernels is False:
        return False
    cfg = model.dit.cfg
    reason = (cuda_build.dit_unsupported_reason(cfg.embed_dim, cfg.num_heads) if fused
              else "the generic DiT form (the CUDA ops work on the fused form)")
    if reason and options.cuda_dit_kernels:
        raise ExportError(f"semvoc's CUDA ops do not cover this DiT: {reason}")
    if reason:
        _log(f"  note: --cuda-kernels: the DiT keeps onnxruntime's ops ({reason}); the vocoder uses semvoc's")
    return not reason


def _fused_dit(model: SemanticVocoderModel, options: ExportOptions) -> bool:
    supported = supports_fused(model.dit)
    if options.dit_form == "fused" and not supported:
        raise ExportError("--dit-form fused: this DiT configuration has no fused form (see "
                          "semvoc.export.fused_dit.supports_fused); use --dit-form generic or auto")
    if options.dit_form == "fused" and options.trt:
        raise ExportError("--dit-form fused cannot go with --trt: TensorRT does not run onnxruntime's "
                          "contrib ops; use --dit-form generic or auto")
    return supported and options.dit_form != "generic" and not options.trt


def _export_one(spec: GraphSpec, duration: float | None, tmp: Path, graph_model, reference, model, dims: Dims,
                dtypes: dict, options: ExportOptions, provider: str, frames: list[int], trace_frames: int,
                custom_ops: Path | None = None):
    """Export one graph, check its structure and parity; returns (name, manifest entry, parity)."""
    cfg = model.cfg
    comp_dtype = {"float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}[dtypes[spec.component]]
    f = trace_frames if duration is None else round(duration * cfg.sampling.latent_frames_per_second)
    trace = pipeline_feeds(reference, dims, 2, f, seed=0, compute_dtype=comp_dtype,
                           components={"text", spec.component})
    stem = spec.name if duration is None else f"{spec.name}_{duration:g}s"
    path = tmp / f"{stem}.onnx"
    t0 = time.time()
    files = onnx_export.export_graph(spec, spec.wrapper(graph_model).eval(), trace, path, options.verbose)
    structure = onnx_export.check_structure(spec, path, _expected_attention(spec, model))
    name, entry = _graph_entries(spec, dims, dtypes, duration, files, tmp)
    _record_onnx_dims(entry, path)
    entry["structure"] = structure
    result = _parity(spec, path, entry, reference, dims, options, provider,
                     frames=f if duration is not None else frames[0], dtype=dtypes[spec.component],
                     custom_ops=custom_ops)
    result["export_seconds"] = round(time.time() - t0, 1)
    return name, entry, result


def _with_islands(spec: GraphSpec, result: tuple, tmp: Path, reference, dims: Dims, options: ExportOptions,
                  provider: str, plan, custom_ops: Path | None) -> tuple:
    """An fp16 graph that missed parity: search its fp32 islands (``export.islands``), rewrite the
    file with them and check parity again. Returns (name, entry, parity) as ``_export_one``."""
    import onnx

    from semvoc.export.islands import find_fp32_islands

    name, entry, first = result
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        _log(f"  note: {name}: no per-node fp32 islands without polygraphy (pip install 'semvoc[export]')")
        return result
    path = tmp / entry["file"]
    f = first["frames"]
    why = (f"fp16 parity error {first['max_rel_error']:.3g} exceeds {first['bound']:g}" if not first["passed"]
           else "calibration saw activations past the fp16 limit")
    _log(f"  note: {name}: {why}; looking for the nodes that diverge in fp16 (polygraphy)")
    t0 = time.time()
    feeds = pipeline_feeds(reference, dims, first["batch"], f, seed=1234, compute_dtype=torch.float32,
                           components={"text", spec.component}, loop_steps=options.parity_steps)
    graph_dtypes = {t["name"]: NUMPY_DTYPES[t["dtype"]] for t in entry["inputs"]}
    ort_feeds = {t.name: feeds[t.name].cpu().numpy().astype(graph_dtypes[t.name]) for t in spec.inputs}
    search = find_fp32_islands(onnx.load(str(path)), ort_feeds,
                               lambda p: make_session(p, provider, custom_ops=custom_ops))
    if not search.nodes:
        first["fp32_islands"] = search.report()
        return result
    # the step graphs' weights, and any graph's past 64 MiB, go to <graph>.onnx.data
    weights = sum(np.prod(t.dims, dtype=np.int64) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                  for t in search.model.graph.initializer)
    external = spec.loop or entry.get("data_file") is not None or weights > onnx_export.SEPARATE_WEIGHTS_BYTES
    data = path.with_name(path.name + ".data")
    onnx_export.save_model(search.model, path, external)
    entry["data_file"] = data.relative_to(tmp).as_posix() if external and data.exists() else None
    entry["structure"] = onnx_export.check_structure(spec, path, _expected_attention(spec, reference))
    again = _parity(spec, path, entry, reference, dims, options, provider, frames=f, dtype=first["dtype"],
                    custom_ops=custom_ops)
    again["fp32_islands"] = {**search.report(), "parity_error_without": first["max_rel_error"],
                             "seconds": round(time.time() - t0, 1)}
    again["export_seconds"] = first.get("export_seconds")
    entry["fp32_islands"] = search.nodes
    verdict = "passes" if again["passed"] else "still misses"
    note = (f"{spec.component}: {name} keeps {len(search.nodes)} node(s) in fp32 ({', '.join(search.nodes[:6])}"
            f"{', ...' if len(search.nodes) > 6 else ''}); fp16 parity error {first['max_rel_error']:.3g} -> "
            f"{again['max_rel_error']:.3g}, {verdict} the bound")
    _log("  note: " + note)
    plan.notes.append(note)
    if again["passed"]:
        plan.islands[name] = search.nodes
    return name, entry, again


def _expected_attention(spec: GraphSpec, model: SemanticVocoderModel) -> int | None:
    if spec.name == "dit_step":
        per_block = 2 if model.dit.context_fusion == "cross" else 1
        return per_block * len(model.dit.blocks)
    if spec.name == "semantic_encoder":
        return model.cfg.semantic.depth if model.cfg.semantic else None
    return None


def _parity(spec: GraphSpec, path: Path, entry: dict, reference: SemanticVocoderModel, dims: Dims,
            options: ExportOptions, provider: str, frames: int, dtype: str, custom_ops: Path | None = None) -> dict:
    session = make_session(path, provider, custom_ops=custom_ops)
    batch = 2 if 2 <= max(options.batch_sizes) else 1
    feeds = pipeline_feeds(reference, dims, batch, frames, seed=1234, compute_dtype=torch.float32,
                           components={"text", spec.component}, loop_steps=options.parity_steps)
    graph_dtypes = {t["name"]: NUMPY_DTYPES[t["dtype"]] for t in entry["inputs"]}
    result = check_graph(spec, session, spec.wrapper(reference).eval(), feeds, graph_dtypes,
                         options.parity_steps, BOUNDS[dtype])
    result.update(provider=provider, dtype=dtype, batch=batch, frames=frames)
    del session
    return result


def engine_summary(out: Path) -> str:
    manifest = json.loads((out / MANIFEST).read_text())
    lines = [f"{name}: max rel error {err:.2e}" for name, err in manifest["parity"]["max_rel_error"].items()]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return "\n".join([f"engine: {out} ({size / 1e6:.1f} MB, {manifest['precision']['dtype']})", *lines])

