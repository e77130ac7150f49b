"""``semvoc-export``: a checkpoint (or a built-in preset) -> an engine directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semvoc.kernels.cuda_build import DEFAULT_ARCH as DEFAULT_CUDA_ARCH

EPILOG = """\
examples:
  # the built-in demo model (tiny, untrained), fp32, for a quick CPU test
  semvoc-export --preset demo --out engines/demo

  # the released model for GPU serving: fp16 graphs, batch buckets 1/4/16, 10-second clips
  huggingface-cli download ZeyuXie/SemanticVocoder --local-dir ckpt/SemanticVocoder
  huggingface-cli download google/flan-t5-large --local-dir ckpt/flan-t5-large \\
      --include "*.json" "spiece.model"
  semvoc-export --checkpoint ckpt/SemanticVocoder --tokenizer ckpt/flan-t5-large \\
      --fp16 --device cuda --out engines/semvoc-fp16

  # the GPU engine above uses semvoc's own CUDA ops whenever nvcc is there to build them:
  # pip install 'semvoc[cuda-kernels]' brings nvcc and the CUDA headers from PyPI (no GPU needed
  # to build). --cuda-kernels makes them required, --no-cuda-kernels leaves them out.

environment (--cuda-kernels exports, for A/B measurements):
  SEMVOC_EXPORT_WITHOUT=Op[,Op]  leave those fused ops or rewrites out (e.g. LtGemm, CrossAttention,
                                 PReLUSplit: the vocoder blocks' MLP as relu and linear GEMMs,
                                 SplitMlp: that MLP as one op of two GEMMs, where it was three)

what it writes (DIR):
  manifest.json   schema, versions, precision, buckets, defaults, graph I/O, sha256 of every file
  tokenizer.json  the T5 tokenizer the runtime uses (no transformers at serve time)
  parity.json     every graph vs its PyTorch module on fresh inputs (max relative error)
  *.onnx          text_encoder, dit_prepare, dit_time, dit_step, vocoder_prepare, vocoder_time,
                  vocoder_step, semantic_encoder_<d>s  (+ .data files for weights past 2 GB)
  kernels/        libsemvoc_cuda.so, semvoc's CUDA ops (the engine then runs on onnxruntime-cuda only)

The export is atomic: it is built next to DIR (in .DIR.partial-PID) and renamed into place at
the end. A partial folder left by an export that was killed hard is removed by the next export
to the same DIR once its process is gone (one still running is left alone). The export fails
if a graph's parity error exceeds the bound of its precision (--allow-parity-failure to keep
it anyway). Nothing is ever downloaded.

exit status: 0 the engine was written; 2 nothing was written because an option, an input
(checkpoint, tokenizer, config) or --out cannot be used, or parity failed (the message says
what to change); 1 an internal error; 130 interrupted (143 for SIGTERM). --debug shows the
Python traceback.
"""

#: what semvoc-export imports beyond the runtime: the `export` extra
EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from err
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive durations, got {text!r}")
    return tuple(sorted(set(values)))


def _components(text: str) -> tuple[str, ...]:
    from semvoc.export.engine import COMPONENTS

    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = sorted(set(values) - set(COMPONENTS))
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown component(s) {unknown or [text]}; choose from "
                                         f"{','.join(COMPONENTS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semvoc-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Export a SemanticVocoder model to an engine directory of ONNX graphs (fused "
                    "attention, optional fp16, parity-checked) that semvoc-run serves without PyTorch.")
    src = p.add_argument_group("model (choose one)")
    which = src.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help="folder of the Hugging Face ZeyuXie/SemanticVocoder layout (config.json + "
                            "model.safetensors), or your own weights in that layout")
    which.add_argument("--preset", choices=["demo", "small", "reference"],
                       help="built-in configuration with seeded random (UNTRAINED) weights: demo (tiny), "
                            "small (CPU benchmark size), reference (the release's shapes)")
    src.add_argument("--seed", type=int, default=0, help="weight seed for --preset (default 0)")
    src.add_argument("--vocoder-snapshot", type=Path, metavar="PATH",
                     help="replace the vocoder with a ZeyuXie/SemanticVocoderSnapshot folder (.pt + config.json)")
    src.add_argument("--t5-config", type=Path, metavar="FILE",
                     help="config.json of the T5 when the checkpoint names one semvoc does not know")
    src.add_argument("--t5-weights", type=Path, metavar="FILE", help="separate T5 encoder weights")
    src.add_argument("--dasheng-weights", type=Path, metavar="FILE", help="separate Dasheng weights")
    src.add_argument("--trust-checkpoint", action="store_true",
                     help="allow pickled objects in .pt files (only for files you trust)")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, metavar="DIR", help="engine directory to write")
    out.add_argument("--force", action="store_true", help="replace a non-empty --out")
    prec = out.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true",
                      help="fp16 graphs with fp32 islands chosen by calibration and, per node, by parity (for GPUs; "
                           "default fp32)")
    prec.add_argument("--bf16", action="store_true", help="bf16 graphs (for GPUs; experimental)")
    out.add_argument("--components", type=_components, default=("text", "dit", "vocoder", "semantic"),
                     help="graphs to export (default text,dit,vocoder,semantic)")
    out.add_argument("--tokenizer", type=Path, metavar="DIR",
                     help="T5 tokenizer folder (tokenizer.json or spiece.model); default: the built-in "
                          "demo tokenizer, which only suits the presets")
    out.add_argument("--trt", action="store_true",
                     help="also build TensorRT plans (needs the `trt` extra; UNVERIFIED path; "
                          "implies --dit-form generic)")
    out.add_argument("--dit-form", default="auto", choices=["auto", "fused", "generic"],
                     help="DiT graphs as onnxruntime runs them fastest (fused: packed heads, "
                          "SkipLayerNormalization, RotaryEmbedding, BiasGelu; ~40 %% fewer GPU kernels) or "
                          "as plain ONNX (generic). auto: fused where the configuration allows it, "
                          "generic with --trt (TensorRT fuses on its own and lacks the onnxruntime ops)")
    kernels = out.add_mutually_exclusive_group()
    kernels.add_argument("--cuda-kernels", nargs="?", const="all", choices=["auto", "all", "vocoder"],
                         default="auto",
                         help="run semvoc's own CUDA ops (a library compiled with nvcc into DIR/kernels/): the "
                              "vocoder's ConvNeXt blocks and, in the fused DiT form, the DiT's qk-norms + RoPE, "
                              "gated residual + norm and GEGLU (where the DiT's head size is 64 or 128). Fewer, "
                              "fused GPU kernels per step; the engine then runs on onnxruntime-cuda only. "
                              "auto (default): with --device cuda, whenever they can be built here (nvcc from "
                              "pip install 'semvoc[cuda-kernels]' or a CUDA toolkit); the log says in one line "
                              "what was chosen and why. all (the flag alone): required. vocoder: the vocoder's only")
    kernels.add_argument("--no-cuda-kernels", dest="cuda_kernels", action="store_const", const="off",
                         help="onnxruntime's own ops only (an engine for onnxruntime-cuda, -cpu and TensorRT)")
    out.add_argument("--ort-include", type=Path, metavar="DIR",
                     help="build semvoc's CUDA ops against this official onnxruntime_c_api.h (the include/ "
                          "folder of an onnxruntime release; default: $SEMVOC_ORT_INCLUDE, else semvoc's own "
                          "declaration of the API, which needs no download)")
    out.add_argument("--cuda-arch", default=DEFAULT_CUDA_ARCH, metavar="CC",
                     help=f"GPU architectures of semvoc's CUDA ops: compute capabilities (default "
                          f"{DEFAULT_CUDA_ARCH}, plus PTX of the last for newer GPUs) or native (this GPU only)")

    shape = p.add_argument_group("buckets")
    shape.add_argument("--batch-sizes", type=_int_list, default=(1, 4, 16), metavar="N,N",
                       help="batch buckets the runtime serves (default 1,4,16)")
    shape.add_argument("--durations", type=_float_list, default=(10.0,), metavar="S,S",
                       help="clip durations in seconds, 25 latent frames per second (default 10)")
    shape.add_argument("--max-text-tokens", type=int, default=128, metavar="N",
                       help="text bucket: prompts are padded (or truncated) to N tokens (default 128)")
    shape.add_argument("--max-steps", type=int, default=250, metavar="N",
                       help="largest DiT step count the runtime may use (default 250)")
    shape.add_argument("--max-vocoder-steps", type=int, default=400, metavar="N",
                       help="largest vocoder step count the runtime may use (default 400)")

    chk = p.add_argument_group("checks")
    chk.add_argument("--allow-parity-failure", action="store_true",
                     help="write graphs whose parity error exceeds the bound (reported in parity.json)")
    chk.add_argument("--parity-steps", type=int, default=3, metavar="N",
                     help="consecutive steps checked for the step graphs (default 3)")
    chk.add_argument("--no-calibration", action="store_true",
                     help="--fp16 without measuring activations (every component in fp16)")
    chk.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where PyTorch runs calibration and parity references (default cpu)")
    p.add_argument("--verbose", action="store_true",
                   help="show the exporter's own output and onnxruntime's warnings and info messages")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return p


def missing_export_modules() -> list[str]:
    """The `export` extra's modules that cannot be imported here (a runtime-only install)."""
    import importlib

    missing = []
    for name in EXPORT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _read_json(path: Path, option: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{option} {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{option} {path} must hold a JSON object")
    return data


def check_inputs(args) -> None:
    """Problems with the given files, found before loading gigabytes of weights."""
    # a missing --checkpoint is reported by the loader, with the command that fetches it
    for option, path in (("--vocoder-snapshot", args.vocoder_snapshot),
                         ("--t5-weights", args.t5_weights), ("--dasheng-weights", args.dasheng_weights),
                         ("--tokenizer", args.tokenizer), ("--t5-config", args.t5_config)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{option} {path}: not found")
    if args.preset and args.t5_config:
        raise ValueError("--t5-config describes the T5 of a --checkpoint; a --preset has its own (drop --t5-config)")
    if args.checkpoint is not None and args.checkpoint.is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} is a file: pass the folder that holds config.json "
                         "and model.safetensors (the ZeyuXie/SemanticVocoder layout)")
    if args.tokenizer is not None:
        from semvoc.runtime.tokenizer import TextTokenizer

        folder = args.tokenizer
        target = folder if folder.is_file() else folder / "tokenizer.json"
        if target.is_file():
            TextTokenizer(target, 1)  # parses it: a damaged file fails here, naming itself
        elif not (folder / "spiece.model").is_file():
            raise FileNotFoundError(f"--tokenizer {folder} holds neither tokenizer.json nor spiece.model: pass "
                                    "the folder of the checkpoint's T5 tokenizer (e.g. google/flan-t5-large)")
    for name, value, low in (("--max-text-tokens", args.max_text_tokens, 2), ("--max-steps", args.max_steps, 1),
                             ("--max-vocoder-steps", args.max_vocoder_steps, 1),
                             ("--parity-steps", args.parity_steps, 1)):
        if value < low:
            raise ValueError(f"{name} {value}: must be at least {low}")


def load_source(args):
    import torch

    from semvoc.export.engine import ModelSource
    from semvoc.models import checkpoint as ckpt
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    if args.preset:
        model = build_model(preset(args.preset), seed=args.seed)
        source = ModelSource(model, f"preset {args.preset} (seed {args.seed}, UNTRAINED random weights)",
                             untrained=True, extra={"preset": args.preset, "seed": args.seed})
    else:
        t5 = _read_json(args.t5_config, "--t5-config") if args.t5_config else None
        model = ckpt.load_official(args.checkpoint, t5_config=t5)
        source = ModelSource(model, str(args.checkpoint.resolve()), untrained=False)
    if args.vocoder_snapshot:
        vocoder = ckpt.load_vocoder_snapshot(args.vocoder_snapshot, args.trust_checkpoint)
        if vocoder.cfg.latent_dim != model.cfg.vocoder.latent_dim:
            raise ValueError(f"vocoder snapshot latent_dim {vocoder.cfg.latent_dim} != the model's "
                             f"{model.cfg.vocoder.latent_dim}")
        model.vocoder = vocoder
        source.extra["vocoder_snapshot"] = str(args.vocoder_snapshot.resolve())
    if args.t5_weights:
        ckpt.load_t5_weights(model, args.t5_weights)
    if args.dasheng_weights:
        ckpt.load_dasheng_weights(model, args.dasheng_weights, args.trust_checkpoint)
    torch.set_grad_enabled(False)
    return source


def main(argv: list[str] | None = None) -> int:
    from semvoc.runtime.cli import guarded

    args = build_parser().parse_args(argv)
    return guarded("semvoc-export", lambda: _main(args), error_message, debug=args.debug,
                   stopped="nothing was written")


def error_message(err: Exception) -> tuple[int, str]:
    """Exit status and one-line message: 2 for what the user can change, 1 for internal errors."""
    from semvoc.export.engine import ExportError
    from semvoc.models.checkpoint import CheckpointError
    from semvoc.models.config import ConfigError
    from semvoc.runtime.manifest import EngineError

    if isinstance(err, (ExportError, ConfigError, CheckpointError, EngineError, FileNotFoundError,
                        NotImplementedError, ValueError)):
        return 2, str(err)
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        return 2, f"{err.strerror or err}{where}; nothing was written"
    return 1, (f"{type(err).__name__}: {err} (an internal error: rerun with --debug for the traceback and "
               "report it); nothing was written")


def _main(args) -> int:
    missing = missing_export_modules()
    if missing:
        print(f"semvoc-export: error: exporting needs {', '.join(missing)}, which this install lacks "
              "(semvoc-run alone needs none of them): pip install 'semvoc[export]'", file=sys.stderr)
        return 2
    from semvoc.export.engine import ExportOptions, check_out_dir, engine_summary, export_engine

    if args.trt:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            print("semvoc-export: error: --trt needs TensorRT: pip install 'semvoc[trt]' on a machine "
                  "with an NVIDIA GPU (tensorrt >= 10.14). Nothing was written.", file=sys.stderr)
            return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("semvoc-export: error: --device cuda but PyTorch sees no CUDA GPU; use --device cpu",
                  file=sys.stderr)
            return 2
    from semvoc.runtime.backends.ort_common import set_ort_verbose

    set_ort_verbose(args.verbose)
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    options = ExportOptions(
        out=args.out, dtype=dtype, batch_sizes=args.batch_sizes, durations=args.durations,
        max_text_tokens=args.max_text_tokens, components=args.components, tokenizer=args.tokenizer,
        max_dit_steps=args.max_steps, max_vocoder_steps=args.max_vocoder_steps,
        parity_steps=args.parity_steps, allow_parity_failure=args.allow_parity_failure,
        force=args.force, trt=args.trt, calibrate=not args.no_calibration, device=args.device,
        dit_form=args.dit_form, cuda_kernels=args.cuda_kernels in ("all", "vocoder"),
        cuda_kernels_auto=args.cuda_kernels == "auto",
        cuda_dit_kernels=False if args.cuda_kernels == "vocoder" else None, ort_include=args.ort_include,
        cuda_arch=args.cuda_arch, verbose=args.verbose)
    check_inputs(args)
    check_out_dir(args.out, args.force)  # fail before loading gigabytes of weights
    source = load_source(args)
    out = export_engine(source, options)
    print(engine_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
