"""The official samplers in PyTorch: the DiT's CFG flow-matching loop and the vocoder loop.

``dit_sample`` is ``SingleTaskCrossAttentionAudioFlowMatching.inference`` +
``iterative_denoise`` with diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 1), written
out: CFG batch ``[uncond; cond]`` with zero context and the conditional mask, the sway
schedule, 0-dim timesteps (so the UDiT embeds ``trunc(t)``), and the Euler update in float32.
The schedule is computed with torch ops exactly as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from semvoc.models.udit import UDiT


def official_sigmas(num_steps: int, sway_coef: float | None) -> torch.Tensor:
    """``scheduler.sigmas`` after ``set_timesteps(sigmas=...)``: float32, terminal 0 appended."""
    if not sway_coef:
        sigmas = torch.from_numpy(np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32))
    else:
        t = torch.linspace(0, 1, num_steps + 1)
        t = t + sway_coef * (torch.cos(torch.pi / 2 * t) - 1 + t)
        sigmas = (1 - t).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


@dataclass
class DitTrace:
    """Per-call intermediates, for parity checks against the official loop."""

    timesteps: list[torch.Tensor] = field(default_factory=list)
    backbone_in: list[torch.Tensor] = field(default_factory=list)
    backbone_out: list[torch.Tensor] = field(default_factory=list)
    guided: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def dit_sample(dit: UDiT, context: torch.Tensor, context_mask: torch.Tensor,
               latent_init: torch.Tensor, num_steps: int, guidance_scale: float,
               sway_coef: float | None = -1.0, trace: DitTrace | None = None) -> torch.Tensor:
    """context ``[B, S, Dc]``, context_mask ``[B, S]`` bool, latent_init ``[B, C, T]``."""
    cfg = guidance_scale > 1.0
    if cfg:
        context = torch.cat([torch.zeros_like(context), context])
        context_mask = torch.cat([context_mask, context_mask])
    sigmas = official_sigmas(num_steps, sway_coef).to(latent_init.device)
    timesteps = sigmas[:-1] * 1000.0
    latent = latent_init
    if trace is not None:
        trace.latents.append(latent)
    for k, timestep in enumerate(timesteps):
        backbone_in = torch.cat([latent, latent]) if cfg else latent
        out = dit(x=backbone_in, timesteps=timestep, context=context, context_mask=context_mask)
        if cfg:
            uncond, cond = out.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
        else:
            guided = out
        latent = (latent.to(torch.float32) + (sigmas[k + 1] - sigmas[k]) * guided).to(guided.dtype)
        if trace is not None:
            trace.timesteps.append(timestep)
            trace.backbone_in.append(backbone_in)
            trace.backbone_out.append(out)
            trace.guided.append(guided)
            trace.latents.append(latent)
    return latent
