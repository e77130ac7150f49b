"""``semvoc-run``: generate audio from an engine directory, without PyTorch."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from semvoc.runtime.jobs import file_stem, read_prompts  # noqa: F401 (the job path's helpers, re-exported)

EPILOG = """\
examples:
  semvoc-run --engine engines/demo --prompt "a dog barks while rain falls" --out dog.wav
  semvoc-run --engine engines/fp16 --prompts data/audiocaps_test_captions.jsonl \\
      --out-dir out/audiocaps --batch-size 16          # resumable: finished wavs are skipped
  semvoc-run --engine engines/fp16 --prompts captions.jsonl --out-dir out/caps \\
      --ray                                            # the same job over a Ray cluster (semvoc[serve])
  semvoc-run --engine engines/fp16 --audio speech.flac --out resynth.wav   # audio -> audio

prompts files: JSONL with "caption" (and optional "audio_id", used for the file name), or
plain text with one prompt per line. Two prompts that would write the same file name are
refused. Beside each NAME.wav, NAME.wav.json records what made it (prompt, index, seed, steps,
guidance, duration, engine): a later run skips a wav only when that record matches its request,
and refuses other existing wavs unless --overwrite is given. The same --seed gives the same
audio on the same backend and machine; prompt i of a run draws its noise from (seed, i), whatever the batching.
Prompts longer than the engine's text bucket are truncated with a warning.

--audio takes a recording of any length: it is resynthesised in windows of the --duration
bucket that overlap by 1 s (a quarter of the window at most) and are crossfaded, read and
written block by block (memory holds --batch-size windows: default the largest exported
bucket on a GPU, 1 on the CPU); the output has the input's duration at the engine's rate.

exit status (one rule, whether a problem is found before or after the engine loads):
  0    done
  2    the command cannot be served as given: a bad option or value (e.g. --steps outside the
       engine's range), or an input file, output path or engine directory that cannot be used;
       the message names the option or file and what to change
  1    the run failed while generating or writing (NaN/Inf, disk full, an internal error)
  130  interrupted (Ctrl-C; 143 for SIGTERM); finished files are complete, no partial file is left
--debug shows the Python traceback of any error.
"""


def build_parser() -> argparse.ArgumentParser:
    from semvoc.runtime.select import BACKENDS

    p = argparse.ArgumentParser(
        prog="semvoc-run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Generate audio with a SemanticVocoder engine (made by semvoc-export). Needs no "
                    "PyTorch: onnxruntime on the CPU, onnxruntime CUDA with CUDA graphs on a GPU.")
    p.add_argument("--engine", type=Path, required=True, metavar="DIR", help="engine directory")
    src = p.add_argument_group("input (choose one)")
    src.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="text description of the audio (repeat for several)")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="JSONL (caption, audio_id) or text lines")
    src.add_argument("--audio", type=Path, metavar="FILE",
                     help="resynthesise a recording (any rate/channels): semantic encoder -> vocoder")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="FILE.wav", help="output file (one prompt or --audio)")
    out.add_argument("--out-dir", type=Path, metavar="DIR", help="output directory (one wav per prompt)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace existing wavs made by another request or engine (without it they are "
                          "refused; wavs made by the same request are always skipped)")
    gen = p.add_argument_group("generation (defaults come from the engine)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--steps", type=int, help="DiT steps (official default 100)")
    gen.add_argument("--vocoder-steps", type=int, help="vocoder steps (official default 200)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 3.5)")
    gen.add_argument("--duration", type=float, help="seconds; an exported duration bucket (default: the first)")
    gen.add_argument("--batch-size", type=int,
                     help="prompts per batch (default and upper bound: the largest exported bucket)")
    run = p.add_argument_group("execution")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (CUDA if available, else CPU), onnxruntime-cpu, onnxruntime-cuda, "
                          "tensorrt (unverified)")
    run.add_argument("--device-id", type=int, default=0, help="GPU index (default 0)")
    run.add_argument("--threads", type=int, help="CPU threads for onnxruntime-cpu (default: all cores)")
    run.add_argument("--no-verify", action="store_true", help="skip the sha256 check of engine files")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    run.add_argument("--verbose", action="store_true", help="show onnxruntime's warnings and info messages")
    run.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                     help="run a --prompts job on Ray Data: one Pipeline per GPU (or per CPU worker) over "
                          "the cluster at ADDRESS (default: a running local cluster, else a new local "
                          "instance); --out-dir must be visible to every node. Needs semvoc[serve]")
    run.add_argument("--ray-workers", type=int, metavar="N",
                     help="with --ray: pipelines in the pool (default: one per GPU, else one per CPU "
                          "worker slot of --threads cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = sum(bool(x) for x in (args.prompt, args.prompts, args.audio))
    if sources != 1:
        parser.error("give exactly one of --prompt, --prompts or --audio")
    if args.out and args.out_dir:
        parser.error("give --out or --out-dir, not both")
    if not args.out and not args.out_dir:
        parser.error("give --out FILE.wav or --out-dir DIR")
    if args.audio and (args.steps is not None or args.guidance is not None):
        parser.error("--steps and --guidance set the text-to-latent DiT, which --audio does not run "
                     "(resynthesis uses the vocoder alone: --vocoder-steps)")
    from semvoc.runtime.backends.ort_common import set_ort_verbose

    set_ort_verbose(args.verbose)
    return guarded("semvoc-run", lambda: _run(args, parser), error_message, debug=args.debug,
                   stopped="finished files are complete, no partial file was written")


def guarded(prog: str, body, describe, *, debug: bool, stopped: str) -> int:
    """Run a command's ``body`` by the exit-status rule of ``--help``: Ctrl-C 130 and SIGTERM 143
    (raised where Ctrl-C would be, so temp files go the same way; ``stopped`` says what is left),
    other errors one line from ``describe(err) -> (status, message)``, the traceback with ``debug``."""
    main_thread = threading.current_thread() is threading.main_thread()  # signals: main thread only
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return body()
    except KeyboardInterrupt as stop:
        print(f"\n{prog}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}; {stopped}",
              file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except Exception as err:
        if debug:
            raise
        code, message = describe(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that temp files are removed the same way."""


def _terminate(signum, frame) -> None:
    raise Terminated


#: exit status of a command that cannot be served as given (argparse's own usage errors give 2 too)
USAGE = 2
#: exit status of a run that failed while generating or writing
FAILED = 1


def error_message(err: Exception) -> tuple[int, str]:
    """The exit status and one-line message for an error, by the rule in ``--help``."""
    from semvoc.runtime.backends.base import BackendUnavailable, NonFiniteError
    from semvoc.runtime.manifest import EngineError
    from semvoc.runtime.request import RequestError

    if isinstance(err, RequestError):
        return USAGE, err.for_option()
    if isinstance(err, (EngineError, BackendUnavailable, FileNotFoundError, PermissionError,
                        IsADirectoryError, NotADirectoryError, ValueError)):
        return USAGE, str(err)
    if isinstance(err, NonFiniteError):
        return FAILED, str(err)
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        return FAILED, f"{err.strerror or err}{where}"
    return FAILED, (f"{type(err).__name__}: {err} (an internal error: rerun with --debug for the traceback "
                    "and report it)")


def _run(args, parser) -> int:
    from semvoc.runtime.audio import open_audio, write_wav_atomic
    from semvoc.runtime.pipeline import Pipeline
    from semvoc.runtime.request import check_seed

    # checks before the engine loads (a problem found later gets the same exit status)
    check_seed(args.seed)
    if args.prompts:
        items = read_prompts(args.prompts)
    elif args.prompt:
        items = [(p, None) for p in args.prompt]
    else:
        items = []
    for number, (caption, _) in enumerate(items, start=1):
        if not caption.strip():
            raise ValueError(f"prompt #{number} is empty: give a text description of the audio")
    if args.out and len(items) > 1:
        parser.error(f"{len(items)} prompts need --out-dir, not --out")
    if args.out and args.out.suffix.lower() != ".wav":
        parser.error("--out must end in .wav")
    _check_writable(args.out.parent if args.out else args.out_dir)
    if args.audio:
        open_audio(args.audio).close()  # readable, not empty: before loading the engine
    if args.ray:
        return _run_on_ray(args, items)
    pipe = Pipeline(args.engine, args.backend, device_id=args.device_id, verify=not args.no_verify,
                    threads=args.threads)
    pipe.check(seed=args.seed, steps=args.steps, vocoder_steps=args.vocoder_steps, guidance=args.guidance,
               duration=args.duration, text=not args.audio)
    if pipe.manifest.untrained:
        print(f"semvoc-run: note: {pipe.manifest.data['model']['source']}: the audio will be noise-like",
              file=sys.stderr)
    started = time.perf_counter()
    try:
        if args.audio:
            produced = _resynthesize(args, pipe)
        else:
            produced = _generate(args, pipe, items, write_wav_atomic)
        backend = pipe.backend.describe()
    finally:
        pipe.close()
    wall = time.perf_counter() - started
    clips, seconds = produced
    if clips:
        print(f"semvoc-run: {clips} clip(s), {seconds:.1f} s of audio in {wall:.2f} s wall on "
              f"{backend}; real-time factor {wall / seconds:.4f} "
              f"({seconds / wall:.1f}x faster than real time)", file=sys.stderr)
    return 0


def _check_writable(folder: Path) -> None:
    import os
    import tempfile

    target = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not target.is_dir():
        raise NotADirectoryError(f"cannot write to {folder}: {target} is a file, not a directory; "
                                 "choose another output")
    if not os.access(target, os.W_OK):
        raise PermissionError(f"cannot write to {folder}: permission denied; choose another output")
    if target == folder:  # os.access answers for root even on read-only mounts: try it
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise PermissionError(f"cannot write to {folder} ({err.strerror}); choose another output") from err


def _resynthesize(args, pipe) -> tuple[int, float]:
    from tqdm import tqdm

    path = args.out or (args.out_dir / f"{args.audio.stem}_resynth.wav")
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a directory; give a .wav file name")
    bar = tqdm(unit="window", disable=args.quiet, file=sys.stderr, leave=False)

    def window_done(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = pipe.resynthesize_file(args.audio, path, seed=args.seed, vocoder_steps=args.vocoder_steps,
                                        duration=args.duration, batch_size=args.batch_size,
                                        on_window=window_done)
    finally:
        bar.close()
    print(path)
    return 1, result.seconds_of_audio


def _generate(args, pipe, items, write) -> tuple[int, float]:
    from tqdm import tqdm

    from semvoc.runtime import jobs

    request = jobs.resolve_request(pipe.manifest, seed=args.seed, steps=args.steps,
                                   vocoder_steps=args.vocoder_steps, guidance=args.guidance,
                                   duration=args.duration)
    size = jobs.chunk_size(args.batch_size, pipe.manifest.buckets["batch_sizes"], len(items))
    if args.batch_size and size < args.batch_size:
        print(f"semvoc-run: note: --batch-size {args.batch_size} runs in batches of {size}, the engine's "
              "largest batch bucket", file=sys.stderr)
    engine = jobs.engine_identity(pipe.manifest)
    plan = jobs.plan_outputs(items, request, engine, out_dir=args.out_dir, out=args.out,
                             overwrite=args.overwrite)
    _report_plan(plan)
    prompt_bar = tqdm(total=len(plan.todo), unit="clip", disable=args.quiet or len(plan.todo) <= 1,
                      file=sys.stderr)
    step_bar = tqdm(total=request.steps + request.vocoder_steps, unit="step", file=sys.stderr, leave=False,
                    disable=args.quiet or len(plan.todo) != 1)

    def progress(stage: str, done: int) -> None:
        if done == 1:  # a new loop starts: name it once, not on every step
            step_bar.set_description(stage)
        step_bar.update(1)

    def finished(chunk, _seconds) -> None:
        if len(items) == 1:
            print(chunk[0].path)
        prompt_bar.update(len(chunk))

    produced = jobs.run_local(pipe, plan, request, engine, size, on_chunk=finished,
                              progress=progress if not step_bar.disable else None)
    step_bar.close()
    prompt_bar.close()
    return produced


def _report_plan(plan) -> None:
    for note in plan.notes():
        print(f"semvoc-run: {note}", file=sys.stderr)


def _run_on_ray(args, items) -> int:
    if args.audio or not args.out_dir:
        raise ValueError("--ray runs --prompts (or --prompt) jobs into --out-dir; drop --ray for --audio or --out")
    try:
        import ray  # noqa: F401 (the extra's presence, checked before any work)

        from semvoc.serve.offline import run_job
    except ImportError as err:
        raise ValueError(f"--ray needs Ray: pip install 'semvoc[serve]' ({err})") from err
    return run_job(args, items)


if __name__ == "__main__":
    sys.exit(main())
