"""Eager PyTorch pipeline with the official semantics: text -> audio, audio <-> latents.

This is the reference the exported engine is checked against, and the "official-equivalent"
system of the benchmarks. It tokenizes with the same ``tokenizer.json`` as the runtime and
draws the same seeded noise (``semvoc.runtime.noise``), or takes injected noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semvoc.models.model import SemanticVocoderModel
from semvoc.models.sampling import dit_sample
from semvoc.models.vocoder import peak_normalise
from semvoc.runtime.noise import batch_noise
from semvoc.runtime.tokenizer import TextTokenizer


@dataclass
class GenerationSettings:
    num_steps: int = 100
    guidance_scale: float = 3.5
    sway_sampling_coef: float | None = -1.0
    vocoder_steps: int = 200
    duration_s: float = 10.0


class EagerPipeline:
    def __init__(self, model: SemanticVocoderModel, tokenizer: TextTokenizer | None = None,
                 device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.cfg = model.cfg

    def latent_frames(self, duration_s: float) -> int:
        return round(duration_s * self.cfg.sampling.latent_frames_per_second)

    @torch.no_grad()
    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        ids = torch.from_numpy(np.asarray(input_ids, np.int64)).to(self.device)
        mask = torch.from_numpy(np.asarray(attention_mask, np.int64)).to(self.device)
        return self.model.text_encoder(ids, mask), mask == 1

    @torch.no_grad()
    def latents_to_audio(self, latents: torch.Tensor, audio_noise: np.ndarray | torch.Tensor,
                         vocoder_steps: int) -> torch.Tensor:
        """Official ``SemanticVocoder.decode``: Euler loop, clamp, peak-normalise -> ``[B, L]``."""
        noise = torch.as_tensor(audio_noise, dtype=torch.float32, device=self.device)
        wav = self.model.vocoder.infer(latents, noise, vocoder_steps,
                                       clamp_pred=self.cfg.sampling.clamp_pred)
        return peak_normalise(wav)

    @torch.no_grad()
    def text_to_audio(self, prompts: list[str] | None = None, *, seed: int = 0,
                      settings: GenerationSettings | None = None,
                      input_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
                      latent_noise: np.ndarray | None = None,
                      audio_noise: np.ndarray | None = None) -> np.ndarray:
        """Waveforms ``[B, L]`` float32 at ``sample_rate``; noise drawn from ``seed`` unless given."""
        s = settings or GenerationSettings()
        if input_ids is None:
            if self.tokenizer is None:
                raise ValueError("give prompts with a tokenizer, or input_ids/attention_mask")
            tokens = self.tokenizer(prompts)
            input_ids, attention_mask = tokens.input_ids, tokens.attention_mask
        batch = input_ids.shape[0]
        frames = self.latent_frames(s.duration_s)
        samples = frames * self.cfg.samples_per_latent_frame
        if latent_noise is None or audio_noise is None:
            drawn = batch_noise(seed, list(range(batch)), (self.cfg.latent_channels, frames), samples)
            latent_noise = drawn[0] if latent_noise is None else latent_noise
            audio_noise = drawn[1] if audio_noise is None else audio_noise
        context, context_mask = self.encode_text(input_ids, attention_mask)
        latent = dit_sample(self.model.dit, context, context_mask,
                            torch.as_tensor(latent_noise, device=self.device), s.num_steps,
                            s.guidance_scale, s.sway_sampling_coef)
        return self.latents_to_audio(latent, audio_noise, s.vocoder_steps).cpu().numpy()

    @torch.no_grad()
    def audio_to_latents(self, waveform: np.ndarray) -> torch.Tensor:
        """``[B, L]`` at the model's sample rate -> latents ``[B, D, T']`` (the official encode)."""
        if self.model.semantic_encoder is None:
            raise ValueError("this model has no semantic encoder")
        audio = torch.as_tensor(np.asarray(waveform, np.float32), device=self.device)
        return self.model.semantic_encoder(audio[:, None])

    @torch.no_grad()
    def resynthesize(self, waveform: np.ndarray, *, seed: int = 0, vocoder_steps: int = 200,
                     audio_noise: np.ndarray | None = None) -> np.ndarray:
        latents = self.audio_to_latents(waveform)
        samples = latents.shape[-1] * self.cfg.samples_per_latent_frame
        if audio_noise is None:
            audio_noise = batch_noise(seed, list(range(latents.shape[0])), tuple(latents.shape[1:]), samples)[1]
        return self.latents_to_audio(latents, audio_noise, vocoder_steps).cpu().numpy()
