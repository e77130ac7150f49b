"""Model definitions: official key layout at full size, config mapping, strict loading, pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semvoc.models.checkpoint import (
    CheckpointError,
    load_official,
    load_strict,
    load_vocoder_snapshot,
)
from semvoc.models.config import ConfigError, from_official_config, preset, udit_config, vocoder_config
from semvoc.models.model import SemanticVocoderModel, build_model, parameter_counts
from tests.reference import reference_root

MANIFESTS = reference_root() / "manifests"


@pytest.fixture(scope="module")
def reference_on_meta():
    with torch.device("meta"):
        return SemanticVocoderModel(preset("reference"))


@pytest.mark.parametrize("component,manifest", [
    ("dit", "udit_full"), ("vocoder", "vocoder_full"), ("text_encoder", "t5_text_encoder_full"),
    ("semantic_encoder", "dasheng_base")])
def test_reference_preset_has_the_official_full_size_keys(reference_on_meta, component, manifest):
    """Every key and shape of the released modules (manifests built from the official code)."""
    path = MANIFESTS / f"{manifest}.json"
    if not path.exists():
        pytest.fail(f"manifest {path} missing: set SEMVOC_REFERENCE_DIR to the reference root")
    expected = {k["key"]: tuple(k["shape"]) for k in json.loads(path.read_text())["keys"]}
    module = getattr(reference_on_meta, component)
    if component == "semantic_encoder":
        module = module.dasheng_model
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(expected)) == [], "extra keys"
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}, "mis-shaped keys"


def test_reference_preset_parameter_counts_match_manifests(reference_on_meta):
    summary = json.loads((MANIFESTS / "summary.json").read_text())
    counts = parameter_counts(reference_on_meta)
    assert counts["dit"] == summary["udit_full"]["parameter_count"]
    assert counts["vocoder"] == summary["vocoder_full"]["parameter_count"]
    assert counts["text_encoder"] == summary["t5_text_encoder_full"]["parameter_count"]
    assert counts["semantic_encoder"] == summary["dasheng_base"]["parameter_count"]


def _official_config(cfg) -> dict:
    """A hydra-style config.json like the release's, for a given ModelConfig."""
    dit = {"_target_": "models.dit.mask_dit.UDiT", **{k: v for k, v in vars(cfg.dit).items()}}
    prefix = "models.autoencoder.waveform.semanticVocoder."
    gen = {"_target_": prefix + "flow2gan.models.generator.MaeAudioGenerator",
           **{k: (list(v) if isinstance(v, tuple) else v)
              for k, v in vars(cfg.vocoder).items() if k != "extra"}}
    return {"model_config": {
        "_target_": "models.flow_matching.SingleTaskCrossAttentionAudioFlowMatching",
        "autoencoder": {"_target_": prefix + "semanticVocoder.SemanticVocoder",
                        "vocoder": gen, "encoder_name": "dasheng_base", "n_timesteps": 200},
        "content_encoder": {"_target_": "models.content_encoder.content_encoder.ContentEncoder",
                            "embed_dim": "${backbone.context_dim}",
                            "text_encoder": {
                                "_target_": "models.content_encoder.text_encoder.T5TextEncoder",
                                "model_name": "google/flan-t5-large",
                                "embed_dim": "${backbone.context_dim}"}},
        "backbone": dit, "cfg_drop_ratio": 0.2}}


def test_official_config_maps_to_the_reference_preset():
    cfg = preset("reference")
    mapped = from_official_config(_official_config(cfg))
    assert mapped.dit == cfg.dit
    assert mapped.vocoder == cfg.vocoder
    assert mapped.text.embed_dim == 1024 and mapped.text.t5["d_model"] == 1024
    assert mapped.semantic == cfg.semantic


def test_unknown_arguments_are_errors_that_name_them():
    with pytest.raises(ConfigError, match="flux_capacitor"):
        udit_config({"embed_dim": 64, "flux_capacitor": True})
    with pytest.raises(ConfigError, match="warp"):
        vocoder_config({"latent_dim": 8, "hop_length": 48, "warp": 9})
    bad = _official_config(preset("demo"))
    bad["model_config"]["backbone"]["_target_"] = "models.dit.mask_dit.MaskDiT"
    with pytest.raises(ConfigError, match="MaskDiT"):
        from_official_config(bad)


def _save_official_folder(model: SemanticVocoderModel, folder: Path, config: dict) -> None:
    from safetensors.torch import save_file

    mapping = model.official_state_dict_keys()
    ours = model.state_dict()
    tensors = {official: ours[mine].contiguous().clone() for official, mine in mapping.items()}
    tensors["model.dummy_param"] = torch.empty(0)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def test_official_folder_round_trip(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(preset("demo"), semantic=None)  # dasheng sizes are fixed by name
    model = build_model(cfg, seed=3)
    config = _official_config(cfg)
    config["model_config"]["autoencoder"]["encoder_name"] = "none"
    config["model_config"]["content_encoder"]["text_encoder"]["t5_config"] = cfg.text.t5
    _save_official_folder(model, tmp_path, config)
    loaded = load_official(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_strict_loading_lists_every_problem_in_one_error():
    cfg = preset("demo")
    vocoder = build_model(cfg, seed=0).vocoder
    tensors = dict(vocoder.state_dict())
    tensors.pop("cond_encoder.in_proj.weight")
    tensors["estimators.0.decoder.bogus"] = torch.zeros(1)
    tensors["estimators.1.decoder.out_proj.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        load_strict(vocoder, tensors, "test weights")
    message = str(err.value)
    assert "cond_encoder.in_proj.weight" in message
    assert "estimators.0.decoder.bogus" in message
    assert "estimators.1.decoder.out_proj.bias" in message


def test_missing_checkpoint_says_what_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download ZeyuXie/SemanticVocoder"):
        load_official(tmp_path)


def test_vocoder_snapshot_loads(tmp_path):
    cfg = preset("demo").vocoder
    vocoder = build_model(preset("demo"), seed=1).vocoder
    torch.save({"model": vocoder.state_dict()}, tmp_path / "generator.pt")
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items() if k != "extra"}
    (tmp_path / "config.json").write_text(json.dumps({"generator": kwargs}))
    loaded = load_vocoder_snapshot(tmp_path)
    latents = torch.randn(1, cfg.latent_dim, 3)
    noise = torch.randn(1, 3 * cfg.hop_length)
    assert torch.equal(vocoder.infer(latents, noise, 2), loaded.infer(latents, noise, 2))


def test_conv_spectral_lowering_matches_torch_stft_path():
    model = build_model(preset("demo"), seed=2)
    latents = torch.randn(2, 32, 4)
    noise = torch.randn(2, 4 * 960)
    reference = model.vocoder.infer(latents, noise, 3)
    model.vocoder.use_conv_spectral()
    lowered = model.vocoder.infer(latents, noise, 3)
    assert (lowered - reference).abs().max() < 1e-5


def test_eager_pipeline_batch_matches_single_prompts():
    from semvoc.export.tokenizer import demo_tokenizer_path
    from semvoc.models.pipeline import EagerPipeline, GenerationSettings
    from semvoc.runtime.tokenizer import TextTokenizer

    pipe = EagerPipeline(build_model(preset("demo"), seed=0), TextTokenizer(demo_tokenizer_path(), 16))
    settings = GenerationSettings(num_steps=4, vocoder_steps=3, duration_s=0.4)
    prompts = ["a dog barks", "rain falls on a tin roof while thunder rumbles"]
    batch = pipe.text_to_audio(prompts, seed=7, settings=settings)
    assert batch.shape == (2, int(0.4 * 25) * 960)
    assert np.isfinite(batch).all() and np.abs(batch).max() <= 1.0
    first = pipe.text_to_audio(prompts[:1], seed=7, settings=settings)
    np.testing.assert_allclose(batch[:1], first, atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


def test_resynthesis_shapes():
    from semvoc.models.pipeline import EagerPipeline

    pipe = EagerPipeline(build_model(preset("demo"), seed=0))
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 24000)).astype(np.float32)
    latents = pipe.audio_to_latents(wav)
    assert latents.shape == (1, 32, 25)
    out = pipe.resynthesize(wav, vocoder_steps=2)
    assert out.shape == (1, 25 * 960)


@pytest.mark.parametrize("overrides", [
    {"time_fusion": "ada"}, {"time_fusion": "ada_single"}, {"time_fusion": "ada_sola"},
    {"time_fusion": "token"}, {"qk_norm": "rmsnorm", "norm_layer": "rmsnorm"}, {"qk_norm": None},
    {"act_layer": "gelu"}, {"act_layer": "gelu-approximate"}, {"act_layer": "geglu-approximate"},
    {"act_layer": "snake"}, {"act_layer": "gesnake"}, {"pe_method": "abs", "context_pe_method": "sinu",
                                                        "context_max_length": 7},
    {"rope_mode": "none"}, {"skip": False}, {"skip_norm": False}, {"use_conv": False}, {"patch_size": 2},
    {"context_fusion": "concat", "context_max_length": 7, "rope_mode": "x_only"},
    {"context_fusion": "concat", "context_max_length": 7, "time_fusion": "token", "rope_mode": "dual"},
])
def test_udit_option_space_builds_and_runs(overrides):
    """Every official option builds, keeps the output shape and reacts to the text (no NaN)."""
    from semvoc.models.model import init_random_weights
    from semvoc.models.udit import UDiT

    kwargs = {**dict(img_size=20, patch_size=1, in_chans=8, input_type="1d", out_chans=8, embed_dim=32, depth=2,
                     num_heads=4, qk_norm="layernorm", act_layer="geglu", norm_layer="layernorm", context_norm=True,
                     time_fusion="ada_sola_bias", ada_sola_rank=2, ada_sola_alpha=2, context_dim=16,
                     context_fusion="cross", context_max_length=None, context_pe_method="none", pe_method="none",
                     rope_mode="shared", use_conv=True, skip=True, skip_norm=True), **overrides}
    dit = init_random_weights(UDiT(udit_config(kwargs)).eval(), seed=0)
    x, ctx = torch.randn(2, 8, 20), torch.randn(2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.no_grad():
        out = dit(x, torch.tensor(500.0), ctx, context_mask=mask)
        other = dit(x, torch.tensor(500.0), ctx * 2, context_mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, other)


@pytest.mark.parametrize("overrides", [
    {"branch_reduction": "sum"}, {"use_cond_encoder": False}, {"pred_x1": False}, {"residual_scale": None},
    {"n_ffts": [64], "hop_lengths": [16], "channels": [16], "conv_kernel_sizes": [5], "num_layers": [1]},
    {"n_ffts": [48, 24, 12, 6], "hop_lengths": [24, 12, 6, 3], "channels": [16, 16, 8, 8],
     "conv_kernel_sizes": [3, 5, 7, 9], "num_layers": [1, 2, 1, 2]},
    {"spec_scaling_loss": True},
])
def test_vocoder_option_space_and_spectral_lowering(overrides):
    from semvoc.models.model import init_random_weights
    from semvoc.models.vocoder import Vocoder

    kwargs = {**dict(latent_dim=8, hop_length=48, n_ffts=[32, 16], hop_lengths=[16, 8], channels=[16, 12],
                     time_embed_channels=8, hidden_factor=2, conv_kernel_sizes=[7, 7], num_layers=[1, 1],
                     cond_enc_channels=12, cond_enc_num_layers=1, spec_scaling_loss=False), **overrides}
    vocoder = init_random_weights(Vocoder(vocoder_config(kwargs)).eval(), seed=0)
    latents, noise = torch.randn(2, 8, 5), torch.randn(2, 5 * 48)
    reference = vocoder.infer(latents, noise, 3)
    vocoder.use_conv_spectral()
    lowered = vocoder.infer(latents, noise, 3)
    assert reference.shape == (2, 240) and torch.isfinite(reference).all()
    assert (lowered - reference).abs().max() < 1e-4
