"""The concept file: round trip, and the export that standard SD1.5 tools load."""

import copy

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from datencoder_core import (Concept, LoRAConfig, LoRAFactors, architecture_fingerprint, discover_sites, load_encoder,
                             save_encoder)
from training.models import build_random_models


def _concept(sites, token_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.1 for s in sites}, 0.75)
    return Concept(torch.randn(token_dim, generator=g), lora, 70, "f</w>", 0.25,
                   architecture_fingerprint(sites, token_dim), "enc@123")


def test_concept_round_trip_is_bit_exact(backend, tmp_path):
    concept = _concept(backend.sites)
    concept.save(tmp_path / "cat.safetensors")
    loaded = Concept.load(tmp_path / "cat.safetensors", expected_fingerprint=concept.base_fingerprint)
    assert torch.equal(loaded.v_star, concept.v_star)
    assert loaded.lora.down.keys() == concept.lora.down.keys()
    assert all(torch.equal(loaded.lora.down[k], concept.lora.down[k]) and torch.equal(loaded.lora.up[k], concept.lora.up[k])
               for k in concept.lora.down)
    assert (loaded.token_id, loaded.token, loaded.alpha_blend, loaded.lora.scale, loaded.rank, loaded.encoder_id) == (
        70, "f</w>", 0.25, 0.75, 4, "enc@123")
    assert [p.name for p in tmp_path.iterdir()] == ["cat.safetensors"]  # no temporary file left behind


def test_encoder_round_trip_is_bit_exact(tiny_models, encoder, tmp_path):
    encoder_id = save_encoder(encoder, tmp_path / "enc.safetensors", name="tiny")
    loaded, loaded_id = load_encoder(tmp_path / "enc.safetensors")
    assert loaded_id == encoder_id and encoder_id.startswith("tiny@")
    assert loaded.config == encoder.config and loaded.sites == encoder.sites
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = torch.randn(1, 257, 32), torch.randn(1, 64, 2, 2)
    assert torch.equal(loaded(*inputs).v_star, encoder(*inputs).v_star)


def test_export_loads_in_diffusers_and_equals_merged_weights(tmp_path):
    models = build_random_models("tiny", seed=3)
    concept = _concept(discover_sites(models.unet.named_modules(), LoRAConfig().targets))
    concept.export(tmp_path / "cat_lora.safetensors", tmp_path / "cat_embedding.safetensors")

    merged = copy.deepcopy(models.unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for site, a in concept.lora.down.items():
            modules[site].weight += concept.lora.scale * concept.lora.up[site] @ a
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="cat_lora.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "cat_embedding.safetensors"), token="<cat>")

    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([100, 800])
    merged.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        theirs = pipe.unet(latents, t, encoder_hidden_states=context).sample
        ours = merged(latents, t, encoder_hidden_states=context).sample
        unpatched = build_random_models("tiny", seed=3).unet(latents, t, encoder_hidden_states=context).sample
    assert not torch.allclose(theirs, unpatched, atol=1e-4)  # the LoRA did load
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    token_id = pipe.tokenizer.convert_tokens_to_ids("<cat>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], concept.v_star)


def test_exported_alpha_reproduces_scale(backend, tmp_path):
    from safetensors.torch import load_file

    concept = _concept(backend.sites)
    concept.export(tmp_path / "l.safetensors", tmp_path / "e.safetensors")
    tensors = load_file(tmp_path / "l.safetensors")
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {0.75 * 4}  # alpha / rank = scale, kohya's convention
    assert len(tensors) == 3 * len(backend.sites)
