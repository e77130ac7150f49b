"""Initial noise from a seed, shared by the runtime and the eager PyTorch pipeline.

Each prompt draws from its own ``numpy.random.default_rng([seed, index])`` (``index`` = its
position in the request), first the DiT latent noise ``[C, T]``, then the vocoder noise
``[L]`` (standard normal; the vocoder scales it by ``init_noise_scale``). A prompt's audio
therefore depends on the seed and its position only, not on how prompts are batched.
"""

from __future__ import annotations

import numpy as np


def prompt_noise(seed: int, index: int, latent_shape: tuple[int, int],
                 audio_samples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(seed), int(index)])
    latent = rng.standard_normal(latent_shape, dtype=np.float32)
    audio = rng.standard_normal(audio_samples, dtype=np.float32)
    return latent, audio


def batch_noise(seed: int, indices: list[int], latent_shape: tuple[int, int],
                audio_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, C, T]`` latent and ``[B, L]`` audio noise for the prompts at ``indices``."""
    pairs = [prompt_noise(seed, i, latent_shape, audio_samples) for i in indices]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
