"""The reference fixture set (golden vectors computed by the official code): discovery, loading
and a per-component runner that computes every listed output with our PyTorch modules.

The root is ``$SEMVOC_REFERENCE_DIR`` (default ``../shared/reference`` beside the repo); cases
are ``<root>/cases/<case>/{config.json, weights.safetensors, io.npz}`` (or ``<root>/<case>/``).
Dispatch is on ``config["component"]``, sizes and options come from the config, never from
folder names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "reference"


def reference_root() -> Path:
    return Path(os.environ.get("SEMVOC_REFERENCE_DIR", DEFAULT_ROOT))


def discover_cases(root: Path | None = None) -> list[Path]:
    root = root or reference_root()
    base = root / "cases" if (root / "cases").is_dir() else root
    return sorted(p.parent for p in base.glob("*/config.json"))


@dataclass
class Case:
    path: Path
    config: dict
    weights: dict[str, torch.Tensor]
    io: dict[str, np.ndarray]

    @property
    def component(self) -> str:
        return self.config["component"]

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.io[name])


def load_case(path: Path) -> Case:
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    return Case(path, config, load_file(str(path / "weights.safetensors")), dict(np.load(path / "io.npz")))


def compare(name: str, ours, expected: np.ndarray, rel_tol: float) -> str | None:
    """None if ``ours`` matches; else a message. Floats: max abs error <= rel_tol * scale."""
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    if ours.shape != expected.shape:
        return f"{name}: shape {ours.shape} != expected {expected.shape}"
    if expected.dtype.kind in "biu":
        if not np.array_equal(ours.astype(expected.dtype), expected):
            return f"{name}: integer/bool values differ at {int((ours != expected).sum())} positions"
        return None
    if not np.all(np.isfinite(ours)):
        return f"{name}: non-finite values"
    scale = max(float(np.abs(expected).max()), 1e-3)
    err = float(np.abs(ours.astype(np.float64) - expected.astype(np.float64)).max())
    if err > rel_tol * scale:
        return f"{name}: max abs error {err:.3g} > {rel_tol:g} x scale {scale:.3g}"
    return None


# ----------------------------------------------------------------------- per component


def run_dit_forward(case: Case) -> dict:
    from semvoc.models.checkpoint import load_strict
    from semvoc.models.config import udit_config
    from semvoc.models.udit import UDiT

    dit = UDiT(udit_config(case.config["kwargs"])).eval()
    load_strict(dit, case.weights, str(case.path))
    mask = case.tensor("context_mask") if "context_mask" in case.io else None
    out = dit(case.tensor("x"), case.tensor("timesteps"), case.tensor("context"), context_mask=mask)
    return {"output": out}


def run_dit_sampling(case: Case) -> dict:
    from semvoc.models.checkpoint import load_strict
    from semvoc.models.config import udit_config
    from semvoc.models.sampling import DitTrace, dit_sample, official_sigmas
    from semvoc.models.udit import UDiT

    dit = UDiT(udit_config(case.config["kwargs"])).eval()
    load_strict(dit, case.weights, str(case.path))
    call = case.config["call"]
    if call.get("num_samples_per_content", 1) != 1:
        raise NotImplementedError("num_samples_per_content > 1 (the official code fails with CFG)")
    context, mask = case.tensor("context"), case.tensor("context_mask")
    trace = DitTrace()
    latent = dit_sample(dit, context, mask, case.tensor("latent_init"), call["num_steps"],
                        call["guidance_scale"], call.get("sway_sampling_coef"), trace)
    cfg = call["guidance_scale"] > 1.0
    sigmas = official_sigmas(call["num_steps"], call.get("sway_sampling_coef"))
    rows = latent.shape[0] * (2 if cfg else 1)
    embedded = torch.stack([t.expand(rows).long() for t in trace.timesteps])
    return {
        "latent_final": latent,
        "scheduler_sigmas": sigmas,
        "scheduler_timesteps": sigmas[:-1] * 1000.0,
        "backbone_timesteps": torch.stack(trace.timesteps),
        "backbone_timesteps_embedded": embedded,
        "cfg_context": torch.cat([torch.zeros_like(context), context]) if cfg else context,
        "cfg_context_mask": torch.cat([mask, mask]) if cfg else mask,
        "step_backbone_in": torch.stack(trace.backbone_in),
        "step_backbone_out": torch.stack(trace.backbone_out),
        "step_guided": torch.stack(trace.guided),
        "step_latents": torch.stack(trace.latents),
    }


def _vocoder(case: Case):
    from semvoc.models.checkpoint import load_strict
    from semvoc.models.config import vocoder_config
    from semvoc.models.vocoder import Vocoder

    vocoder = Vocoder(vocoder_config(case.config["kwargs"])).eval()
    load_strict(vocoder, case.weights, str(case.path))
    return vocoder


def run_vocoder_step(case: Case) -> dict:
    vocoder = _vocoder(case)
    cond = vocoder.encode_cond(case.tensor("cond"))
    out = {"cond_encoded": cond, "pred": vocoder.process_model(case.tensor("x"), cond, case.tensor("t"))}
    t = case.tensor("t").flatten()
    for i, est in enumerate(vocoder.estimators):
        out[f"dbg_branch_{i}"] = est(case.tensor("x"), cond, t)
    return out


def run_vocoder_sampling(case: Case) -> dict:
    from semvoc.models.vocoder import peak_normalise

    vocoder = _vocoder(case)
    call = case.config["call"]
    trace: dict = {}
    noise_std = case.tensor("noise_std")
    wav = vocoder.infer(case.tensor("cond"), noise_std, call["n_timesteps"],
                        clamp_pred=call.get("clamp_pred", True), trace=trace)
    normalized = peak_normalise(wav) if call.get("normalize", True) else wav
    return {
        "cond_encoded": trace["cond"],
        "noise": noise_std * vocoder.cfg.init_noise_scale,
        "t_span": trace["t_span"],
        "step_t": torch.stack(trace["t"]),
        "step_pred": torch.stack(trace["pred"]),
        "dbg_step_x": torch.stack([*trace["x"], trace["unclamped"]]),
        "waveform_unclamped": trace["unclamped"],
        "waveform": wav,
        "waveform_normalized": normalized,
    }


def run_text_encoder(case: Case) -> dict:
    from semvoc.models.checkpoint import load_strict
    from semvoc.models.text_encoder import TextEncoder, t5_config_for

    kwargs = case.config["kwargs"]
    encoder = TextEncoder(kwargs["embed_dim"], t5_config_for(kwargs.get("model_name", ""),
                                                             case.config.get("t5_config"))).eval()
    load_strict(encoder, case.weights, str(case.path))
    mask = case.tensor("attention_mask")
    hidden = encoder.model(input_ids=case.tensor("input_ids"), attention_mask=mask).last_hidden_state
    return {"output": encoder.proj(hidden), "mask": mask == 1, "dbg_last_hidden_state": hidden}


def run_semantic_encoder(case: Case) -> dict:
    from semvoc.models.checkpoint import load_strict
    from semvoc.models.config import semantic_encoder_config
    from semvoc.models.semantic_encoder import SemanticEncoder

    encoder = SemanticEncoder(semantic_encoder_config(case.config["kwargs"]),
                              sampling_rate=24000).eval()  # as SemanticVocoder builds it
    load_strict(encoder.dasheng_model, case.weights, str(case.path))
    dasheng = encoder.dasheng_model
    out = {}
    if "waveform" in case.io:
        wav = case.tensor("waveform")
        out["embeddings"] = dasheng(wav)
        out["dbg_logmel"] = dasheng.front_end(wav)
        out["dbg_spec_after_bn"] = dasheng.spectrogram(wav)[:, 0]
    if "waveform_24k" in case.io:
        out["latent_from_24k"] = encoder(case.tensor("waveform_24k")[:, None])
    return out


RUNNERS = {
    "dit_forward": run_dit_forward,
    "dit_sampling": run_dit_sampling,
    "vocoder_step": run_vocoder_step,
    "vocoder_sampling": run_vocoder_sampling,
    "text_encoder": run_text_encoder,
    "semantic_encoder": run_semantic_encoder,
}
