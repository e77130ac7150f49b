"""onnxruntime on the CPU: plain ``session.run`` with numpy arrays; every step checked for NaN."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from semvoc.runtime.backends.base import Backend, NonFiniteError, Progress, padded_table
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, make_session
from semvoc.runtime.manifest import GraphInfo, Manifest
from semvoc.runtime.schedules import DitSchedule


class OrtCpuBackend(Backend):
    name = "onnxruntime-cpu"

    def __init__(self, manifest: Manifest, threads: int | None = None):
        super().__init__(manifest)
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self._dit_tables: dict[tuple, np.ndarray] = {}
        self._vocoder_tables: dict[int, list[np.ndarray]] = {}

    def _session(self, graph: GraphInfo):
        if graph.name not in self._sessions:
            self._sessions[graph.name] = make_session(self.manifest.root / graph.file, "cpu",
                                                      threads=self.threads)
        return self._sessions[graph.name]

    def prepare(self, batch: int, frames: int, *, text: bool = True, duration_s: float | None = None) -> None:
        """Create the sessions a request needs in parallel threads (onnxruntime releases the GIL
        while it loads a graph). CPU sessions take any batch, so only the graphs matter."""
        kinds = ["text_encoder", "dit_prepare", "dit_time", "dit_step"] if text else []
        graphs = [self.manifest.graph(kind) for kind in [*kinds, "vocoder_prepare", "vocoder_time", "vocoder_step"]]
        if not text:
            graphs.append(self.manifest.graph("semantic_encoder", duration_s))
        todo = [g for g in graphs if g.name not in self._sessions]
        if len(todo) > 1:
            with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
                list(pool.map(self._session, todo))

    def _run(self, kind: str, feeds: dict, duration_s: float | None = None) -> list[np.ndarray]:
        graph = self.manifest.graph(kind, duration_s)
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=NUMPY_DTYPES[t.dtype]) for t in graph.inputs}
        return self._session(graph).run(None, typed)

    # ------------------------------------------------------------------------------ stages
    def encode_text(self, input_ids, attention_mask):
        return self._run("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def _dit_time_table(self, schedule: DitSchedule) -> np.ndarray:
        key = (schedule.embedded.tobytes(),)
        if key not in self._dit_tables:
            rows = self.manifest.buckets["dit_rows"]
            self._dit_tables = {key: self._run("dit_time", {"timesteps": padded_table(schedule.embedded, rows)})[0]}
        return self._dit_tables[key]

    def _step_loop(self, kind: str, state: str, feeds: dict, steps: int, progress: Progress, stage: str):
        """Run a step graph ``steps`` times, feeding back (state, step); stop at the first NaN/inf."""
        for k in range(steps):
            feeds[state], feeds["step"] = self._run(kind, feeds)
            if not np.isfinite(feeds[state]).all():
                raise NonFiniteError(kind, k)
            if progress:
                progress(stage, k + 1)
        return feeds[state]

    def dit_loop(self, context, context_mask, latent, schedule, calls, guidance, progress: Progress = None):
        kv_names = [t.name for t in self.manifest.graph("dit_prepare").outputs]
        feeds = dict(zip(kv_names, self._run("dit_prepare", {"context": context}), strict=True))
        feeds |= {"time_table": self._dit_time_table(schedule),
                 "sigmas": padded_table(schedule.sigmas, self.manifest.buckets["dit_rows"] + 1, fill=0.0),
                 "context_mask": context_mask,
                 "guidance": np.array([guidance], np.float32),
                 "latent": latent, "step": np.zeros(1, np.int64)}
        return self._step_loop("dit_step", "latent", feeds, calls, progress, "dit")

    def _vocoder_time_table(self, t_span: np.ndarray) -> list[np.ndarray]:
        key = len(t_span)
        if key not in self._vocoder_tables:
            rows = self.manifest.buckets["vocoder_rows"]
            self._vocoder_tables = {key: self._run("vocoder_time", {"t": padded_table(t_span[:-1], rows)})}
        return self._vocoder_tables[key]

    def vocoder_loop(self, latents, audio, t_span, steps, progress: Progress = None):
        biases = self._run("vocoder_prepare", {"latents": latents})
        scales = self._vocoder_time_table(t_span)
        feeds = {"t_span": padded_table(t_span, self.manifest.buckets["vocoder_rows"] + 1, fill=1.0),
                 "audio": audio, "step": np.zeros(1, np.int64)}
        feeds.update({f"cond_bias_{i}": b for i, b in enumerate(biases)})
        feeds.update({f"time_scale_{i}": s for i, s in enumerate(scales)})
        return self._step_loop("vocoder_step", "audio", feeds, steps, progress, "vocoder")

    def encode_audio(self, waveform, duration_s):
        return self._run("semantic_encoder", {"waveform": waveform}, duration_s)[0]

    def close(self):
        self._sessions.clear()
