"""The two ODE time schedules, in numpy float32 (no torch).

DiT (flow matching, diffusers ``FlowMatchEulerDiscreteScheduler`` with shift 1):

- sway coefficient ``s`` (truthy): ``u = linspace(0, 1, N + 1)``,
  ``u += s * (cos(pi/2 u) - 1 + u)``, ``sigmas = 1 - u`` -> ``K = N + 1`` backbone calls;
- no sway (``None`` / 0): ``sigmas = linspace(1, 1/N, N)`` -> ``K = N`` calls;
- ``timesteps = sigmas * 1000`` and the backbone embeds ``trunc(timestep)`` (the official UDiT
  casts 0-dim timesteps with ``.long()``); a terminal 0 is appended to ``sigmas``.

Vocoder (Euler, x1-prediction): ``t_k = linspace(0, 1, n + 1)[k]``, constant ``dt = t_1 - t_0``.

``linspace`` follows torch's scalar formula (``start + step * i`` for the first half,
``end - step * (steps - 1 - i)`` for the rest). torch's own CPU kernel vectorises parts of
this, so its values depend on the CPU's vector width; cos is evaluated in float64 and rounded.
The result can differ from a given torch build by an ulp; the truncated DiT timesteps agreed
for all but 2 of the 1000 step counts 1..1000 checked (tests/test_schedules.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    head = start32 + step * idx.astype(np.float32)
    tail = end32 - step * (steps - 1 - idx).astype(np.float32)
    return np.where(idx < steps // 2, head, tail).astype(np.float32)


@dataclass(frozen=True)
class DitSchedule:
    sigmas: np.ndarray  # [K + 1] float32, ends in 0
    timesteps: np.ndarray  # [K] float32 = sigmas[:-1] * 1000
    embedded: np.ndarray  # [K] float32: trunc(timesteps), what the backbone embeds

    @property
    def num_calls(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def dts(self) -> np.ndarray:
        return (self.sigmas[1:] - self.sigmas[:-1]).astype(np.float32)


def dit_schedule(num_steps: int, sway_coef: float | None = -1.0) -> DitSchedule:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if sway_coef:
        u = linspace_f32(0.0, 1.0, num_steps + 1)
        cos = np.cos((np.float32(np.pi / 2) * u).astype(np.float64)).astype(np.float32)
        u = (u + np.float32(sway_coef) * (cos - np.float32(1.0) + u)).astype(np.float32)
        sigmas = (np.float32(1.0) - u).astype(np.float32)
    else:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    timesteps = (sigmas * np.float32(1000.0)).astype(np.float32)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return DitSchedule(sigmas=sigmas, timesteps=timesteps, embedded=np.trunc(timesteps))


def vocoder_t_span(num_steps: int) -> np.ndarray:
    """``[n + 1]`` float32; step k uses ``t_k`` and ``dt = t_1 - t_0``."""
    if num_steps < 1:
        raise ValueError(f"vocoder steps must be >= 1, got {num_steps}")
    return linspace_f32(0.0, 1.0, num_steps + 1)
