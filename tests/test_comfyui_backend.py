"""The ComfyUI tuning backend against the diffusers reference: same weights, same step, same gradients."""

import dataclasses

import pytest
import torch
from training.headless.comfyui import comfyui_path, pack_module
from training.headless.random_models import comfy_model_from_diffusers, comfy_noise_prediction, random_comfy_clip
from transformers import CLIPTokenizer

from datencoder_core import (Concept, DualPathState, LoRAConfig, LoRAFactors, TuningConfig,
                             architecture_fingerprint, diffusion_loss)
from training.models.reference import _text_encoder, build_random_models

PROMPT = "a photo of {}"


@pytest.fixture(scope="module")
def comfy_models():
    """The diffusers reference models, and ComfyUI's MODEL and CLIP over identical UNet and text-encoder
    weights and tokenizer, created under inference mode, as ComfyUI's loaders create them."""
    folder = comfyui_path() / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(1)
    text_encoder = _text_encoder(tokenizer, 49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4)
    models = dataclasses.replace(build_random_models("tiny", seed=0), text_encoder=text_encoder, tokenizer=tokenizer)
    with torch.inference_mode():
        patcher = comfy_model_from_diffusers(models.unet)
        clip = random_comfy_clip()
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}
        missing, unexpected = clip.load_sd(state)
    assert set(missing) <= {"text_projection.weight"} and not unexpected, (missing, unexpected)
    return models, patcher, clip


@pytest.fixture(scope="module")
def backends(comfy_models):
    """Reference and ComfyUI backends over the same weights."""
    models, patcher, clip = comfy_models
    with torch.inference_mode(False):
        comfy = pack_module("nodes.backend").ComfyUIBackend(patcher, clip, vae=None, clip_vision=None)
    return models.backend(), comfy


def _one_step(backend, token_id, v_star, lora, alpha=0.25):
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 600])
    v = v_star.clone().requires_grad_(True)
    factors = LoRAFactors({k: a.clone().requires_grad_(True) for k, a in lora.down.items()},
                          {k: b.clone().requires_grad_(True) for k, b in lora.up.items()}, lora.scale)
    noisy = backend.alphas_cumprod[t].sqrt()[:, None, None, None] * latents + (
        1 - backend.alphas_cumprod[t]).sqrt()[:, None, None, None] * noise
    soft = backend.encode_prompt(PROMPT, token_id, v).expand(2, -1, -1)
    with torch.no_grad():
        hard = backend.encode_prompt(PROMPT, token_id).expand(2, -1, -1)
    loss = diffusion_loss(backend.predict_noise(noisy, t, soft, DualPathState(factors, alpha, hard)), noise)
    loss.backward()
    return loss.detach(), v.grad, factors


def test_one_tuning_step_gives_the_same_loss_and_gradients(backends):
    reference, comfy = backends
    def shapes(sites):
        return sorted((s.name, s.in_features, s.out_features) for s in sites)

    assert shapes(comfy.sites) == shapes(reference.sites)
    assert torch.allclose(comfy.alphas_cumprod, reference.alphas_cumprod, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in reference.sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.1 for s in reference.sites}, 1.0)
    v_star, token_id = torch.randn(32, generator=g) * 0.5, 2368
    with torch.inference_mode(False):
        comfy_loss, comfy_v_grad, comfy_lora = _one_step(comfy, token_id, v_star, lora)
    ref_loss, ref_v_grad, ref_lora = _one_step(reference, token_id, v_star, lora)
    assert torch.allclose(comfy_loss, ref_loss, rtol=1e-5)
    assert torch.allclose(comfy_v_grad, ref_v_grad, rtol=1e-3, atol=1e-7)
    for site in lora.down:
        assert torch.allclose(comfy_lora.down[site].grad, ref_lora.down[site].grad, rtol=1e-3, atol=1e-7), site
        assert torch.allclose(comfy_lora.up[site].grad, ref_lora.up[site].grad, rtol=1e-3, atol=1e-7), site
    assert comfy_v_grad.abs().sum() > 0


def test_prompts_and_tokens_match_the_reference(backends):
    reference, comfy = backends
    for token_id in (2368, 320):
        assert torch.allclose(comfy.encode_prompt(PROMPT, token_id), reference.encode_prompt(PROMPT, token_id),
                              atol=1e-5)
    assert comfy.decode_token(2368) == reference.decode_token(2368) == "cat</w>"
    assert set(comfy.special_token_ids) == set(reference.special_token_ids)


def test_the_slot_is_the_templates_even_when_the_nearest_word_is_in_the_prompt(backends):
    """v* near "photo", the template "a photo of {}": both backends put v* in the slot (position 4), not
    on the prompt's own "photo"; the causal text model leaves the positions before the slot untouched,
    and only the slot's position depends on v*."""
    reference, comfy = backends
    photo = reference.tokenizer("photo", add_special_tokens=False).input_ids[0]
    v = reference.token_embeddings[photo] + 0.01 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(32, generator=torch.Generator().manual_seed(1))  # sums of LayerNorm outputs are constant
    contexts = []
    for backend in backends:
        prompt = backend.prompt_ids(PROMPT)
        assert prompt.slot == 4 and prompt.ids[2] == photo
        v_star = v.clone().requires_grad_(True)
        with torch.inference_mode(False):
            soft = backend.encode_prompt(prompt, photo, v_star)[0]
            hard = backend.encode_prompt(prompt, photo)[0]
            (before_slot,) = torch.autograd.grad((soft[:4] @ probe).sum(), v_star, retain_graph=True)
            (at_slot,) = torch.autograd.grad(soft[4] @ probe, v_star)
        assert torch.allclose(soft[:4], hard[:4], atol=1e-6) and not torch.allclose(soft[4], hard[4], atol=1e-4)
        assert torch.equal(before_slot, torch.zeros_like(v)) and at_slot.abs().sum() > 0
        contexts.append(soft.detach())
    assert torch.allclose(contexts[0], contexts[1], atol=1e-5)


def test_tuning_honours_clip_skip(backends, comfy_models):
    """With CLIPSetLastLayer's -2 the tuning text context is ComfyUI's own encoding at that layer."""
    _, comfy = backends
    *_, loaded_clip = comfy_models
    cat = 2368  # "cat</w>": the prompt "a photo of cat" has it in the slot
    for layer in (None, -2):
        clip = loaded_clip.clone()
        if layer is not None:
            clip.clip_layer(layer)
        with torch.inference_mode(False):
            ours = type(comfy)(comfy.patcher, clip, vae=None, clip_vision=None).encode_prompt(PROMPT, cat)
        with torch.no_grad():
            theirs = clip.encode_from_tokens(clip.tokenize("a photo of cat"))
        assert torch.allclose(ours, theirs, atol=1e-5), (layer, (ours - theirs).abs().max())
    assert not torch.allclose(comfy.encode_prompt(PROMPT, cat), ours, atol=1e-3)  # the layer matters


def _concept(sites):
    g = torch.Generator().manual_seed(7)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.1 for s in sites}, 1.0)
    return Concept(torch.randn(32, generator=g) * 0.5, lora, 2368, "cat</w>", architecture_fingerprint(sites, 32),
                   "enc@test", TuningConfig(), LoRAConfig().targets)


def _tuning_and_sampling_eps(model, clip, concept, alpha=0.25):
    """eps of ``model`` with ``concept`` at two timesteps: as tuning predicts it (ComfyUIBackend) and as
    sampling does (Dual-Path Model Patch, ComfyUI's own sampling path)."""
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    with torch.inference_mode(False), torch.no_grad():
        tuning = pack_module("nodes.backend").ComfyUIBackend(model, clip, vae=None, clip_vision=None)
        soft = tuning.encode_prompt(PROMPT, concept.token_id, concept.v_star)
        hard = tuning.encode_prompt(PROMPT, concept.token_id)
        tuned = tuning.predict_noise(latents, t, soft.expand(2, -1, -1),
                                     DualPathState(concept.lora, alpha, hard.expand(2, -1, -1)))
        patching = pack_module("nodes.patching")
        [sampled] = comfy_noise_prediction(patching.patch_model(model, concept, alpha),
                                           [[[soft, {patching.HARD_CONTEXT_KEY: hard}]]], latents, t)
    return tuned, sampled


def test_other_packs_attention_patches_change_tuning_as_they_change_sampling(backends, comfy_models):
    """Tuning gets the MODEL's transformer_options as sampling does: another pack's attn1/attn2 patches
    (reading the per-call keys sampling sets: cond_or_uncond, sigmas) and an attn2 output patch change
    tuning's noise prediction by what they change sampling's."""
    _, comfy = backends
    _, model, clip = comfy_models
    concept = _concept(comfy.sites)
    plain_tuned, plain_sampled = _tuning_and_sampling_eps(model, clip, concept)

    patched = model.clone()
    patched.set_model_attn1_patch(lambda n, c, v, extra: (n * (1.25 if extra["cond_or_uncond"] == [0] else 1.0),
                                                          c, v))
    patched.set_model_attn2_patch(lambda n, c, v, extra: (n * (1 + extra["sigmas"].reshape(-1, 1, 1) / 10), c, v))
    patched.set_model_attn2_output_patch(lambda n, extra: n * 0.5)
    tuned, sampled = _tuning_and_sampling_eps(patched, clip, concept)

    assert torch.allclose(plain_tuned, plain_sampled, atol=1e-4), (plain_tuned - plain_sampled).abs().max()
    assert (sampled - plain_sampled).abs().max() > 0.05  # the patches matter
    assert torch.allclose(tuned - plain_tuned, sampled - plain_sampled, atol=1e-4), (tuned - sampled).abs().max()
    assert "patches" not in model.model_options.get("transformer_options", {})  # the input MODEL is untouched


def test_what_sampling_refuses_tuning_refuses(backends, comfy_models):
    """An attn2_replace patch is refused before anything is loaded; a patch that passes a separate value
    is refused at the first forward, as in sampling."""
    from comfy.ldm.modules.attention import optimized_attention

    error = pack_module("datencoder_core").DATEncoderError  # the pack's class, as ComfyUI loads it
    _, comfy = backends
    _, model, clip = comfy_models
    concept = _concept(comfy.sites)
    replaced = model.clone()
    replaced.set_model_attn2_replace(lambda q, k, v, extra: optimized_attention(q, k, v, extra["n_heads"]), "input", 4)
    with pytest.raises(error, match="attn2_replace patches from another node .* 1 cross-attention "
                                              ".* Personalize Concept would silently drop the concept"):
        with torch.inference_mode(False):
            pack_module("nodes.backend").ComfyUIBackend(replaced, clip, vae=None, clip_vision=None)
    valued = model.clone()
    valued.set_model_attn2_patch(lambda n, c, v, _: (n, c, v * 2.0))
    with pytest.raises(error, match="separate value or a mask"):
        _tuning_and_sampling_eps(valued, clip, concept)
