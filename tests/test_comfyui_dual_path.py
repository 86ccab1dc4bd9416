"""The ComfyUI dual path against the diffusers reference, on identical tiny weights, in the real ComfyUI."""

import dataclasses
import re

import pytest
import torch
from training.headless.comfyui import pack_module
from training.headless.random_models import comfy_model_from_diffusers, comfy_noise_prediction

from datencoder_core import (Concept, DATEncoderError, DualPathState, LoRAConfig, LoRAFactors, TuningConfig,
                             architecture_fingerprint)

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
        [ours] = comfy_noise_prediction(patched, [[[soft, {key: hard}]]], latents, t)
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
        positive_eps, negative_eps = comfy_noise_prediction(patched, [[[soft, {key: hard}]], [[negative, {}]]],
                                                            latents, t)
        expected_negative = backend.predict_noise(latents, t, negative.expand(2, -1, -1),
                                                  DualPathState(concept.lora, 0.25, negative.expand(2, -1, -1)))
    assert torch.allclose(negative_eps, expected_negative, atol=1e-4)


def test_input_model_is_untouched(comfy, backend, concept):
    patching, patcher = comfy
    latents, t, soft, hard = _inputs(backend, concept)
    with torch.no_grad():
        [before] = comfy_noise_prediction(patcher, [[[soft, {}]]], latents, t)
        patched = patching.patch_model(patcher, concept, 0.25)
        [during] = comfy_noise_prediction(patched, [[[soft, {}]]], latents, t)
        [after] = comfy_noise_prediction(patcher, [[[soft, {}]]], latents, t)
    assert torch.equal(before, after)
    assert not torch.allclose(before, during, atol=1e-4)
    assert patcher.object_patches == {} and patcher.wrappers == {}  # the patches went on the clone only


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


def test_concept_for_another_model_is_refused(comfy, concept, tmp_path):
    """The message names the concept's file (or, made in this run, its word and encoder), what it was made
    for, what it is used with, and the fix."""
    patching, patcher = comfy
    error = pack_module("datencoder_core").DATEncoderError
    foreign = dataclasses.replace(concept, base_fingerprint="0123456789abcdef")
    fingerprint = architecture_fingerprint(patching.comfy_sites(patcher)[0], 32)
    with pytest.raises(error, match=rf"^the concept with nearest word 'f</w>' \(encoder enc@test\) was made for "
                                    rf"another base model \(fingerprint 0123456789abcdef\) than this MODEL, which it "
                                    rf"is used with \(fingerprint {fingerprint}\)\. Use it with the SD1.x checkpoint "
                                    rf"it was made for \(or a fine-tune of it\), or use one made for this MODEL$"):
        patching.patch_model(patcher, foreign, 0.25)
    foreign.save(tmp_path / "cat.safetensors")
    path = re.escape(str(tmp_path / "cat.safetensors"))
    with pytest.raises(error, match=rf"^the concept {path} was made for another base model \(fingerprint 0123"):
        patching.patch_model(patcher, Concept.load(tmp_path / "cat.safetensors"), 0.25)


def test_fingerprint_agrees_with_the_reference_backend(comfy, backend):
    patching, patcher = comfy
    sites, _ = patching.comfy_sites(patcher)
    assert architecture_fingerprint(sites, 32) == architecture_fingerprint(backend.sites, 32)


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


def _ksampler_unet_calls(model, positive, negative, steps=2, batch=1):
    """Sample with ComfyUI's KSampler (euler, CFG 5) and record the batch size of every UNet call."""
    import nodes as comfy_nodes

    calls = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        (out,) = comfy_nodes.common_ksampler(model, 5, steps, 5.0, "euler", "normal", positive, negative,
                                             {"samples": torch.zeros(batch, 4, 16, 16)})
    finally:
        hook.remove()
    return out["samples"], calls


def test_cfg_runs_one_batched_unet_call_per_step(comfy, backend, concept):
    """Concept positive + plain negative, CFG 5: one UNet call of batch 2 per step, and the same samples
    as when ComfyUI cannot batch them (an extra model cond on the positive alone splits every step)."""
    from comfy.conds import CONDConstant

    patching, patcher = comfy
    _, _, soft, hard = _inputs(backend, concept)
    negative = [[backend.encode_prompt("blurry {}", 5), {}]]
    patched = patching.patch_model(patcher, concept, 0.25)
    batched, calls = _ksampler_unet_calls(patched, [[soft, {patching.HARD_CONTEXT_KEY: hard}]], negative)
    assert calls == [2, 2]
    unbatchable = [[soft, {patching.HARD_CONTEXT_KEY: hard, "model_conds": {"split": CONDConstant(1)}}]]
    separate, separate_calls = _ksampler_unet_calls(patched, unbatchable, negative)
    assert separate_calls == [1] * 4
    assert (batched - separate).abs().max() <= 1e-5 * batched.abs().max()  # float32 rounding of another batch size
    plain, plain_calls = _ksampler_unet_calls(patcher, [[soft, {}]], negative)
    assert plain_calls == [2, 2] and not torch.allclose(plain, batched, atol=1e-3)


def test_attn2_replace_of_another_pack_is_refused(comfy, backend, concept):
    """IPAdapter-style attn2_replace would bypass the dual path: refused when patching and when sampling."""
    patching, patcher = comfy
    core = pack_module("datencoder_core")
    _, _, soft, hard = _inputs(backend, concept)

    from comfy.ldm.modules.attention import optimized_attention

    def replace(q, k, v, extra_options):  # plain attention on base projections, as replace patches see them
        return optimized_attention(q, k, v, extra_options["n_heads"])

    before = patcher.clone()
    before.set_model_attn2_replace(replace, "input", 4)
    with pytest.raises(core.DATEncoderError, match="attn2_replace patches from another node .* 1 cross-attention"):
        patching.patch_model(before, concept, 0.25)
    after = patching.patch_model(patcher, concept, 0.25)
    after.set_model_attn2_replace(replace, "input", 4)
    with pytest.raises(core.DATEncoderError, match="attn2_replace patches from another node"):
        _ksampler_unet_calls(after, [[soft, {patching.HARD_CONTEXT_KEY: hard}]], [[soft, {}]], steps=1)


def test_attention_input_patches_of_another_pack_work_together(comfy, backend, concept):
    """attn1_patch / attn2_patch run before the dual path and pass the context as the value: an identity
    patch changes nothing; one that edits the queries' input takes effect, the dual path still on."""
    patching, patcher = comfy
    latents, t, soft, hard = _inputs(backend, concept)
    cond = [[soft, {patching.HARD_CONTEXT_KEY: hard}]]
    patched = patching.patch_model(patcher, concept, 0.25)
    with torch.no_grad():
        [alone] = comfy_noise_prediction(patched, [cond], latents, t)
        results = {}
        patches = {"identity": lambda n, c, v, _: (n, c, v), "scaled": lambda n, c, v, _: (n * 1.5, c, v)}
        for name, patch in patches.items():
            with_patches = patched.clone()
            with_patches.set_model_attn1_patch(patch)
            with_patches.set_model_attn2_patch(patch)
            [results[name]] = comfy_noise_prediction(with_patches, [cond], latents, t)
            plain = patcher.clone()
            plain.set_model_attn1_patch(patch)
            plain.set_model_attn2_patch(patch)
            [results[f"{name} without concept"]] = comfy_noise_prediction(plain, [cond], latents, t)
    assert torch.equal(results["identity"], alone)
    assert not torch.allclose(results["scaled"], alone, atol=1e-3)
    assert not torch.allclose(results["scaled"], results["scaled without concept"], atol=1e-3)


def test_a_separate_value_from_another_patch_is_refused(comfy, backend, concept):
    patching, patcher = comfy
    core = pack_module("datencoder_core")
    latents, t, soft, hard = _inputs(backend, concept)
    patched = patching.patch_model(patcher, concept, 0.25)
    patched.set_model_attn2_patch(lambda n, c, v, _: (n, c, v * 2.0))
    with pytest.raises(core.DATEncoderError, match="separate value or a mask"):
        with torch.no_grad():
            comfy_noise_prediction(patched, [[[soft, {patching.HARD_CONTEXT_KEY: hard}]]], latents, t)


def test_a_conditioning_changed_after_apply_concept_token_is_refused(comfy, backend, concept):
    import nodes as comfy_nodes

    patching, patcher = comfy
    core = pack_module("datencoder_core")
    latents, t, soft, hard = _inputs(backend, concept)
    (concatenated,) = comfy_nodes.ConditioningConcat().concat([[soft, {patching.HARD_CONTEXT_KEY: hard}]],
                                                             [[backend.encode_prompt("a forest {}", 9), {}]])
    with pytest.raises(core.DATEncoderError, match="was changed afterwards .* ConditioningConcat"):
        with torch.no_grad():
            comfy_noise_prediction(patching.patch_model(patcher, concept, 0.25), [concatenated], latents, t)


def test_a_concept_with_nan_or_inf_is_refused_naming_it(comfy, concept, tmp_path):
    """A diverged concept would sample black or noise: the patch refuses it, naming the concept (its word and
    encoder, or its file)."""
    patching, patcher = comfy
    # the concept is the top-level package's (as the fixture made it), so its own class raises
    error = (pack_module("datencoder_core").DATEncoderError, DATEncoderError)
    site = next(iter(concept.lora.down))
    down = {**concept.lora.down, site: concept.lora.down[site].clone()}
    down[site][0, 0] = float("nan")
    broken = dataclasses.replace(concept, lora=LoRAFactors(down, concept.lora.up, concept.lora.scale))
    with pytest.raises(error, match=rf"^the concept with nearest word 'f</w>' \(encoder enc@test\) holds NaN or inf "
                                    rf"values \(in lora\.{re.escape(site)}\.down\); it cannot be used"):
        patching.patch_model(patcher, broken, 0.25)
    infinite = dataclasses.replace(concept, v_star=torch.full_like(concept.v_star, float("inf")),
                                   source="cat.safetensors")
    with pytest.raises(error, match=r"^the concept cat.safetensors holds NaN or inf values \(in v_star\)"):
        patching.patch_model(patcher, infinite, 0.25)
    assert patching.patch_model(patcher, concept, 0.25) is not patcher  # the finite one still patches
