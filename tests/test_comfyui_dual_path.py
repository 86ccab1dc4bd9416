"""The ComfyUI dual path against the diffusers reference, on identical tiny weights, in the real ComfyUI."""

import dataclasses

import pytest
import torch
from comfyui_runtime import comfy_model_from_diffusers, pack_module

from datencoder_core import Concept, DualPathState, LoRAConfig, LoRAFactors, TuningConfig, architecture_fingerprint

PROMPT = "a photo of {} in the snow"


@pytest.fixture(scope="module")
def comfy(tiny_models):
    return pack_module("nodes.patching"), comfy_model_from_diffusers(tiny_models.unet)


@pytest.fixture(scope="module")
def concept(backend):
    g = torch.Generator().manual_seed(7)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in backend.sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.1 for s in backend.sites}, 1.0)
    return Concept(torch.randn(32, generator=g) * 0.5, lora, 70, "f</w>", architecture_fingerprint(backend.sites, 32),
                   "enc@test", TuningConfig(), LoRAConfig().targets)


def _comfy_noise_prediction(patcher, cond, latents, timesteps, uncond=None):
    """eps from ComfyUI's own sampling internals (cond encoding, batching, model wrapper), for VP-scaled
    latents at integer timesteps, so it compares with the diffusers UNet."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    comfy.model_management.load_models_gpu([patcher])
    patcher.pre_run()
    sigma = patcher.model.model_sampling.sigmas[timesteps]
    x = latents * (sigma**2 + 1).sqrt()[:, None, None, None]
    groups = [comfy.sampler_helpers.convert_cond(c) for c in (cond, uncond) if c is not None]
    groups = [comfy.samplers.encode_model_conds(patcher.model.extra_conds, g, x, x.device, "positive") for g in groups]
    try:
        outputs = comfy.samplers.calc_cond_batch(patcher.model, groups, x, sigma, patcher.model_options)
    finally:
        patcher.cleanup()
    return [(x - out) / sigma[:, None, None, None] for out in outputs]


def _inputs(backend, concept):
    g = torch.Generator().manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    soft = backend.encode_prompt(PROMPT, concept.token_id, concept.v_star)
    hard = backend.encode_prompt(PROMPT, concept.token_id)
    return latents, timesteps, soft, hard


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_comfyui_matches_diffusers_reference(comfy, backend, concept, alpha):
    patching, patcher = comfy
    key = patching.HARD_CONTEXT_KEY
    latents, t, soft, hard = _inputs(backend, concept)
    patched = patching.patch_model(patcher, concept, alpha)
    with torch.no_grad():
        [ours] = _comfy_noise_prediction(patched, [[soft, {key: hard}]], latents, t)
        reference = backend.predict_noise(latents, t, soft.expand(2, -1, -1),
                                          DualPathState(concept.lora, alpha, hard.expand(2, -1, -1)))
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_uncond_chunks_keep_their_own_context(comfy, backend, concept):
    """With CFG the negative prompt is batched with the positive; its hard path uses its own context."""
    patching, patcher = comfy
    key = patching.HARD_CONTEXT_KEY
    latents, t, soft, hard = _inputs(backend, concept)
    negative = backend.encode_prompt("blurry {}", 5)
    patched = patching.patch_model(patcher, concept, 0.25)
    with torch.no_grad():
        positive_eps, negative_eps = _comfy_noise_prediction(patched, [[soft, {key: hard}]], latents, t,
                                                             uncond=[[negative, {}]])
        expected_negative = backend.predict_noise(latents, t, negative.expand(2, -1, -1),
                                                  DualPathState(concept.lora, 0.25, negative.expand(2, -1, -1)))
    assert torch.allclose(negative_eps, expected_negative, atol=1e-4)


def test_input_model_is_untouched(comfy, backend, concept):
    patching, patcher = comfy
    latents, t, soft, hard = _inputs(backend, concept)
    with torch.no_grad():
        [before] = _comfy_noise_prediction(patcher, [[soft, {}]], latents, t)
        patched = patching.patch_model(patcher, concept, 0.25)
        [during] = _comfy_noise_prediction(patched, [[soft, {}]], latents, t)
        [after] = _comfy_noise_prediction(patcher, [[soft, {}]], latents, t)
    assert torch.equal(before, after)
    assert not torch.allclose(before, during, atol=1e-4)
    assert patcher.object_patches == {} and "model_function_wrapper" not in patcher.model_options


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sampling_with_cfg_and_a_batch(comfy, backend, concept, sampler):
    """ComfyUI's KSampler with CFG 5 and two latents: the patched model samples, finitely, differently
    from the original, and the original samples bit-identically before and after."""
    import nodes as comfy_nodes

    patching, patcher = comfy
    _, _, soft, hard = _inputs(backend, concept)
    positive = [[soft, {patching.HARD_CONTEXT_KEY: hard}]]
    negative = [[backend.encode_prompt("blurry {}", 5), {}]]
    latent = {"samples": torch.zeros(2, 4, 16, 16)}

    def sample(model):
        (out,) = comfy_nodes.common_ksampler(model, 3, 4, 5.0, sampler, "normal", positive, negative, latent)
        return out["samples"]

    before = sample(patcher)
    patched = sample(patching.patch_model(patcher, concept, 0.25))
    after = sample(patcher)
    assert patched.shape == (2, 4, 16, 16) and torch.isfinite(patched).all()
    assert not torch.allclose(patched, before, atol=1e-3)
    assert torch.equal(before, after)


def test_comfyui_conditioning_nodes_keep_working(comfy, backend, concept):
    """Combine (with a plain prompt), set area and timestep range after Apply Concept Token's output."""
    import nodes as comfy_nodes

    patching, patcher = comfy
    _, _, soft, hard = _inputs(backend, concept)
    concept_cond = [[soft, {patching.HARD_CONTEXT_KEY: hard}]]
    plain = [[backend.encode_prompt("a forest {}", 9), {}]]
    (combined,) = comfy_nodes.ConditioningCombine().combine(concept_cond, plain)
    (area,) = comfy_nodes.ConditioningSetArea().append(combined, 64, 64, 0, 0, 1.0)
    (timed,) = comfy_nodes.ConditioningSetTimestepRange().set_range(area, 0.0, 0.6)
    assert patching.HARD_CONTEXT_KEY in timed[0][1] and patching.HARD_CONTEXT_KEY not in timed[1][1]
    negative = [[backend.encode_prompt("blurry {}", 5), {}]]
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    patched = patching.patch_model(patcher, concept, 0.25)
    (out,) = comfy_nodes.common_ksampler(patched, 1, 3, 4.0, "euler", "normal", timed, negative, latent)
    (plain_out,) = comfy_nodes.common_ksampler(patcher, 1, 3, 4.0, "euler", "normal", timed, negative, latent)
    assert torch.isfinite(out["samples"]).all() and not torch.allclose(out["samples"], plain_out["samples"], atol=1e-3)


def test_concept_for_another_model_is_refused(comfy, concept):
    patching, patcher = comfy
    foreign = dataclasses.replace(concept, base_fingerprint="0123456789abcdef")
    with pytest.raises(pack_module("datencoder_core").DATEncoderError,
                       match="made for another base model .*fingerprint 0123456789abcdef"):
        patching.patch_model(patcher, foreign, 0.25)


def test_fingerprint_agrees_with_the_reference_backend(comfy, backend):
    patching, patcher = comfy
    sites, _ = patching.comfy_sites(patcher)
    assert architecture_fingerprint(sites, 32) == architecture_fingerprint(backend.sites, 32)


def test_a_second_concept_on_a_patched_model_is_refused(comfy, concept):
    patching, patcher = comfy
    patched = patching.patch_model(patcher, concept, 0.25)
    with pytest.raises(pack_module("datencoder_core").DATEncoderError,
                       match="already went through a Dual-Path Model Patch"):
        patching.patch_model(patched, concept, 0.25)


def test_calls_without_a_concept_run_comfyuis_own_attention(comfy, backend, concept):
    """The plain (negative-only or unpatched-conditioning) path is ComfyUI's forward, bit for bit."""
    patching, patcher = comfy
    _, _, soft, _ = _inputs(backend, concept)
    patched = patching.patch_model(patcher, concept, 0.25)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300.0])
    with torch.no_grad():
        before = patcher.model.diffusion_model(x, t, context=soft)
        import comfy.model_management

        comfy.model_management.load_models_gpu([patched])
        attention = patched.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
        assert isinstance(attention.forward, patching.DualPathAttentionPatch)  # the patch is in place
        during = patched.model.diffusion_model(x, t, context=soft)  # ...and no concept state is given
        patched.unpatch_model()
    assert torch.equal(before, during)
