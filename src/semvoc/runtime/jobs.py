"""Prompt lists -> one wav per prompt in a folder: the job that ``semvoc-run --prompts`` runs in one
process and ``semvoc-run --ray`` runs over a Ray cluster, with the same rules in both.

- Names: ``audio_id`` (its stem, made file-safe) or ``NNNNN_<slug of the caption>``. Two prompts
  whose names collide (case-insensitively, as on macOS and Windows disks) are refused before any work.
- Noise: prompt ``i`` of the list draws from ``(seed, i)`` whatever the batching or the machine.
- Provenance: beside each ``NAME.wav`` a ``NAME.wav.json`` records what made it (prompt, index,
  seed, steps, vocoder steps, guidance, duration, the engine's manifest hash). An existing wav is
  skipped only when its record matches the request; any other existing wav is refused unless
  ``overwrite`` is set (it is then replaced).
- Writes: a stale wav is removed before its new record is written, and the record is written
  before the wav, each through a temp file and a rename: whenever a wav exists, the record beside
  it describes it, and a crash leaves no half-written file.
- Chunks: at most the engine's largest batch bucket per ``Pipeline.generate`` call, whatever
  ``--batch-size`` says, so memory stays what the engine was exported for; each chunk's clips are
  written as soon as it finishes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from semvoc.runtime.manifest import MANIFEST, Manifest, sha256_file
from semvoc.runtime.request import Request, check_request

RECORD_SUFFIX = ".json"  # NAME.wav -> NAME.wav.json
RECORD_VERSION = 1


# ----------------------------------------------------------------------------- prompt lists
def read_prompts(path: Path) -> list[tuple[str, str | None]]:
    """(caption, audio_id or None) from a JSONL or plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err})") from err
            caption = record.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}:{number}: no \"caption\" text")
            items.append((caption, record.get("audio_id")))
        else:
            items.append((line, None))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def file_stem(index: int, caption: str, audio_id: str | None) -> str:
    if audio_id:
        return re.sub(r"[^\w.-]+", "_", Path(str(audio_id)).stem)[:120]
    slug = re.sub(r"[^\w]+", "_", caption.lower()).strip("_")[:60]
    return f"{index:05d}_{slug}"


# ----------------------------------------------------------------------------- the request
def resolve_request(manifest: Manifest, *, seed: int = 0, steps: int | None = None,
                    vocoder_steps: int | None = None, guidance: float | None = None,
                    duration: float | None = None) -> Request:
    """The engine's defaults filled in and every value checked (``semvoc.runtime.request``: the
    messages semvoc-run, the Python API and semvoc-serve share), without loading any graph."""
    return check_request(manifest, seed=seed, steps=steps, vocoder_steps=vocoder_steps, guidance=guidance,
                         duration=duration)


def engine_identity(manifest: Manifest) -> str:
    """sha256 of ``manifest.json``, which itself holds the sha256 of every engine file."""
    return sha256_file(manifest.root / MANIFEST)


# ----------------------------------------------------------------------------- clips and records
@dataclass(frozen=True)
class Clip:
    index: int  # position in the prompt list: the noise comes from (seed, index)
    caption: str
    audio_id: str | None
    path: Path

    def record(self, request: Request, engine: str) -> dict:
        return {"version": RECORD_VERSION, "prompt": self.caption, "audio_id": self.audio_id,
                "index": self.index, **asdict(request), "engine": engine}


def record_path(wav: Path) -> Path:
    return wav.with_name(wav.name + RECORD_SUFFIX)


def read_record(wav: Path) -> dict | None:
    try:
        return json.loads(record_path(wav).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _difference(wav: Path, old: dict | None, new: dict) -> str:
    if old is None:
        return f"no readable {record_path(wav).name} beside it says what made it"
    changed = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in new if key != "audio_id"
               and old.get(key) != new[key]]
    return "made with " + "; ".join(changed) if changed else ""


@dataclass
class Plan:
    clips: list[Clip]  # every prompt, in order
    todo: list[Clip]   # the ones to generate
    skipped: int       # existing wavs made by the same request and engine
    replaced: int      # existing wavs that --overwrite replaces

    def notes(self) -> list[str]:
        """What the plan does with existing files, for the person who started the job."""
        notes = []
        if self.skipped:
            notes.append(f"skipping {self.skipped} existing file(s) made by this request and engine")
        if self.replaced:
            notes.append(f"replacing {self.replaced} existing file(s) made otherwise (--overwrite)")
        return notes


def plan_outputs(items: list[tuple[str, str | None]], request: Request, engine: str, *,
                 out_dir: Path | None = None, out: Path | None = None, overwrite: bool = False) -> Plan:
    """Name every output, refuse name collisions and stale files, and list what is left to do."""
    if out is not None:
        if len(items) != 1:
            raise ValueError(f"{len(items)} prompts need --out-dir, not --out")
        clips = [Clip(0, items[0][0], items[0][1], Path(out))]
    else:
        clips = [Clip(i, c, a, Path(out_dir) / f"{file_stem(i, c, a)}.wav") for i, (c, a) in enumerate(items)]
        seen: dict[str, Clip] = {}
        for clip in clips:
            key = clip.path.name.casefold()
            if key in seen:
                raise ValueError(f"prompts #{seen[key].index + 1} and #{clip.index + 1} would both write "
                                 f"{clip.path.name}: give each prompt a distinct \"audio_id\" (file names "
                                 "are compared ignoring case)")
            seen[key] = clip
    todo, skipped, stale = [], 0, []
    for clip in clips:
        if not clip.path.exists():
            todo.append(clip)
            continue
        why = _difference(clip.path, read_record(clip.path), clip.record(request, engine))
        if not why:
            skipped += 1
        else:
            stale.append((clip, why))
            todo.append(clip)
    if stale and not overwrite:
        clip, why = stale[0]
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise ValueError(f"{clip.path} exists but was not made by this request and engine ({why}){more}; "
                         "pass --overwrite to replace such files, or choose another output")
    return Plan(clips, todo, skipped, len(stale))


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_clip(clip: Clip, audio: np.ndarray, sample_rate: int, record: dict) -> Path:
    """The record, then the wav, each atomically; a wav another request made is removed first,
    so that a wav on disk is always described by the record beside it. Writing the same clip
    twice (a retried task) leaves one wav and one record."""
    from semvoc.runtime.audio import write_wav_atomic

    clip.path.parent.mkdir(parents=True, exist_ok=True)
    if clip.path.exists() and read_record(clip.path) != record:
        clip.path.unlink()
    _write_text_atomic(record_path(clip.path), json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return write_wav_atomic(clip.path, audio, sample_rate)


# ----------------------------------------------------------------------------- running
def chunk_size(batch_size: int | None, buckets: list[int], n_prompts: int) -> int:
    """Prompts per ``generate`` call: ``batch_size`` (default: the largest bucket, or 1 for one
    prompt), never more than the largest exported bucket."""
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"--batch-size must be >= 1 (got {batch_size})")
    largest = max(buckets)
    wanted = batch_size or (largest if n_prompts > 1 else 1)
    return min(wanted, largest)


def chunks(todo: list[Clip], size: int) -> Iterator[list[Clip]]:
    for start in range(0, len(todo), size):
        yield todo[start:start + size]


def generate_clips(pipe, clips: list[Clip], request: Request, engine: str,
                   progress=None) -> tuple[list[Path], float]:
    """One ``Pipeline.generate`` call for ``clips`` (noise from ``(seed, clip.index)``); writes
    each clip with its record. Returns the paths and the seconds of audio made."""
    result = pipe.generate([c.caption for c in clips], seed=request.seed, indices=[c.index for c in clips],
                           steps=request.steps, vocoder_steps=request.vocoder_steps,
                           guidance=request.guidance, duration=request.duration, progress=progress)
    paths = [write_clip(c, result.audio[row], result.sample_rate, c.record(request, engine))
             for row, c in enumerate(clips)]
    return paths, result.seconds_of_audio


def run_local(pipe, plan: Plan, request: Request, engine: str, size: int,
              on_chunk: Callable[[list[Clip], float], None] | None = None,
              progress=None) -> tuple[int, float]:
    """Generate ``plan.todo`` in one process, ``size`` prompts per call. Returns (clips, seconds)."""
    clips, seconds = 0, 0.0
    for chunk in chunks(plan.todo, size):
        _, made = generate_clips(pipe, chunk, request, engine, progress)
        clips += len(chunk)
        seconds += made
        if on_chunk:
            on_chunk(chunk, made)
    return clips, seconds


def incomplete(clips: Iterable[Clip], request: Request, engine: str) -> list[Clip]:
    """The clips whose wav is missing or not described by a matching record."""
    return [c for c in clips if not c.path.is_file() or read_record(c.path) != c.record(request, engine)]


def remove_orphan_temps(clips: Iterable[Clip]) -> int:
    """Delete the temporary files a killed writer left beside these clips' wavs and records (the
    ``.NAME.*.tmp`` of ``write_atomic``-style writes, which a SIGKILL cannot clean up). Call it only
    when no writer of these clips is running, e.g. after a job wrote and verified them all."""
    removed = 0
    for clip in clips:
        for target in (clip.path, record_path(clip.path)):
            for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed
