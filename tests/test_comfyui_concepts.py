"""Several concepts in one prompt, in the real ComfyUI on tiny random models: Apply Concept Token with a
placeholder per concept, stacked Dual-Path Model Patches, per-concept masks."""

import dataclasses

import pytest
import torch
from training.headless.comfyui import pack_module
from training.headless.random_models import comfy_model_from_diffusers, comfy_noise_prediction, random_comfy_clip

from datencoder_core import Concept, DualPathState, LoRAConfig, LoRAFactors, TuningConfig, architecture_fingerprint

TEXT = "a photo of S1* and S2* on the beach"


@pytest.fixture(scope="module")
def comfy(tiny_models):
    """The pack's patching and conditioning modules, a ComfyUI UNet and a ComfyUI CLIP, both 32-d."""
    patching = pack_module("nodes.patching")
    conditioning = pack_module("nodes.conditioning")
    return patching, conditioning, comfy_model_from_diffusers(tiny_models.unet), random_comfy_clip()


def _concept(comfy, seed, token="dog", lora_scale=0.1, v_star=None):
    patching, conditioning, patcher, clip = comfy
    sites, _ = patching.comfy_sites(patcher)
    g = torch.Generator().manual_seed(seed)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * lora_scale for s in sites}, 1.0)
    [token_id] = conditioning.placeholder_ids(clip, token)
    v_star = torch.randn(32, generator=g) * 0.5 if v_star is None else v_star
    return Concept(v_star, lora, token_id, f"{token}</w>", architecture_fingerprint(sites, 32), "enc@test",
                   TuningConfig(), LoRAConfig().targets)


@pytest.fixture(scope="module")
def concepts(comfy):
    return _concept(comfy, 1, "dog"), _concept(comfy, 2, "backpack")


def _latents():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])


def _left_half(value=1.0):
    mask = torch.zeros(1, 128, 128)
    mask[..., :64] = value
    return mask


class SingleConceptWrapper:
    """The APPLY_MODEL wrapper as it was before several concepts: one concept's factors in the state."""

    def __init__(self, lora, alpha):
        self.lora, self.alpha = lora, alpha

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        patching = pack_module("nodes.patching")
        state = DualPathState(self.lora, self.alpha, kwargs.pop(patching.HARD_CONTEXT_KEY))
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, patching.STATE_KEY: state},
                        **kwargs)


def test_one_concept_gives_exactly_the_single_concept_output(comfy, concepts):
    """KSampler with CFG: one concept through the new nodes equals the one-concept wrapper bit for bit."""
    import nodes as comfy_nodes
    from comfy.patcher_extension import WrappersMP

    patching, conditioning, patcher, clip = comfy
    concept = concepts[0]
    positive = conditioning.encode_with_concepts(clip, "a photo of S* on the beach", [("S*", concept)])
    negative = [[clip.encode_from_tokens(clip.tokenize("blurry")), {}]]
    old = patching.with_dual_path_attention(patcher)[0]
    old.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, "old", patching.add_hard_contexts)
    lora = LoRAFactors(concept.lora.down, concept.lora.up, concept.lora.scale * 0.8)
    old.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "old", SingleConceptWrapper(lora, 0.25))
    latent = {"samples": torch.zeros(2, 4, 16, 16)}

    def sample(model):
        (out,) = comfy_nodes.common_ksampler(model, 3, 2, 5.0, "euler", "normal", positive, negative, latent)
        return out["samples"]

    assert torch.equal(sample(patching.patch_model(patcher, concept, 0.25, 0.8)), sample(old))


def test_a_second_concept_without_lora_and_with_its_word_equals_writing_that_word(comfy, concepts):
    patching, conditioning, patcher, clip = comfy
    first = concepts[0]
    [cat] = conditioning.placeholder_ids(clip, "cat")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    word = _concept(comfy, 3, "cat", lora_scale=0.0, v_star=table[cat].detach().clone())
    both = conditioning.encode_with_concepts(clip, TEXT, [("S1*", first), ("S2*", word)])
    alone = conditioning.encode_with_concepts(clip, TEXT.replace("S2*", "cat"), [("S1*", first)])
    stacked = patching.patch_model(patching.patch_model(patcher, first, 0.25), word, 0.25)
    latents, t = _latents()
    with torch.no_grad():
        [ours] = comfy_noise_prediction(stacked, [both], latents, t)
        [expected] = comfy_noise_prediction(patching.patch_model(patcher, first, 0.25), [alone], latents, t)
        [without_first] = comfy_noise_prediction(patcher, [alone], latents, t)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert not torch.allclose(ours, without_first, atol=1e-3)  # the first concept is on


def test_two_concepts_each_with_its_own_strength(comfy, concepts):
    """Stacking adds the offsets: strengths (1, 0) equal the first concept alone, (1, 1) differ from it."""
    patching, conditioning, patcher, clip = comfy
    cond = conditioning.encode_with_concepts(clip, TEXT, list(zip(["S1*", "S2*"], concepts)))
    latents, t = _latents()
    alone = patching.patch_model(patcher, concepts[0], 0.25)
    with torch.no_grad():
        [first] = comfy_noise_prediction(alone, [cond], latents, t)
        [off] = comfy_noise_prediction(patching.patch_model(alone, concepts[1], 0.25, 0.0), [cond], latents, t)
        [on] = comfy_noise_prediction(patching.patch_model(alone, concepts[1], 0.25, 1.0), [cond], latents, t)
    assert torch.allclose(off, first, atol=1e-6)
    assert not torch.allclose(on, first, atol=1e-3)


def test_outside_its_mask_a_concept_changes_no_attention_output(comfy, concepts):
    """Concept 1 masked to the top half, concept 2 to the left half (they overlap in one quadrant): every
    attention module's output outside concept 2's mask, at that module's resolution, equals the module's
    output without concept 2; inside, concept 2 changes it."""
    patching, conditioning, patcher, clip = comfy
    top = _left_half().transpose(-1, -2)
    model = patching.patch_model(patching.patch_model(patcher, concepts[0], 0.25, mask=top), concepts[1], 0.25,
                                 mask=_left_half())
    cond = conditioning.encode_with_concepts(clip, TEXT, list(zip(["S1*", "S2*"], concepts)))
    checked = []

    def compare(module, args, kwargs, output):
        state = kwargs["transformer_options"][patching.STATE_KEY]
        assert len(state.regions) == 2
        without = dataclasses.replace(state, regions=state.regions[:1])
        expected = module.forward(*args, **{**kwargs, "transformer_options": {patching.STATE_KEY: without}})
        outside = state.regions[1].at(output.shape[1]) == 0  # (N, T, 1)
        assert 0 < outside.float().mean() < 1
        assert torch.allclose(output * outside, expected * outside, atol=1e-5)
        assert not torch.allclose(output * ~outside, expected * ~outside, atol=1e-4)
        checked.append(output.shape[1])

    attention = [m for m in patcher.model.diffusion_model.modules() if type(m).__name__ == "CrossAttention"]
    hooks = [m.register_forward_hook(compare, with_kwargs=True) for m in attention]
    latents, t = _latents()
    try:
        with torch.no_grad():
            comfy_noise_prediction(model, [cond], latents, t)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(checked) == len(attention) and set(checked) == {256, 64, 16, 4}  # every resolution of the tiny UNet


@pytest.mark.parametrize("mask_value,expected", [(0.0, "without the concept"), (1.0, "unmasked")])
def test_an_empty_mask_removes_the_concept_and_a_full_mask_changes_nothing(comfy, concepts, mask_value, expected):
    patching, conditioning, patcher, clip = comfy
    cond = conditioning.encode_with_concepts(clip, TEXT, list(zip(["S1*", "S2*"], concepts)))
    first = patching.patch_model(patcher, concepts[0], 0.25)
    reference = first if expected == "without the concept" else patching.patch_model(first, concepts[1], 0.25)
    masked = patching.patch_model(first, concepts[1], 0.25, mask=torch.full((1, 128, 128), mask_value))
    latents, t = _latents()
    with torch.no_grad():
        [ours] = comfy_noise_prediction(masked, [cond], latents, t)
        [theirs] = comfy_noise_prediction(reference, [cond], latents, t)
    # float32 rounding: a masked concept's offsets are added after the others, not summed with them first
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_cfg_with_two_masked_concepts_is_one_batched_unet_call_per_step(comfy, concepts):
    import nodes as comfy_nodes

    patching, conditioning, patcher, clip = comfy
    model = patching.patch_model(patching.patch_model(patcher, concepts[0], 0.25, mask=_left_half()), concepts[1],
                                 0.25, mask=1.0 - _left_half())
    positive = conditioning.encode_with_concepts(clip, TEXT, list(zip(["S1*", "S2*"], concepts)))
    negative = [[clip.encode_from_tokens(clip.tokenize("blurry")), {}]]
    calls = []
    hook = patcher.model.diffusion_model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        (out,) = comfy_nodes.common_ksampler(model, 5, 2, 5.0, "euler", "normal", positive, negative,
                                             {"samples": torch.zeros(2, 4, 16, 16)})
    finally:
        hook.remove()
    assert calls == [4, 4] and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("placeholders,text,message", [
    (["S*", "S*"], "S* and S*", "the same placeholder 'S\\*'; give each concept its own"),
    (["S*", "s*"], "S* and s*", "the same placeholder 'S\\*' and 's\\*' \\(CLIP ignores case\\)"),
    (["S1*", "S2*"], "a photo of S1*", "does not contain the placeholder 'S2\\*'"),
])
def test_placeholder_errors_name_the_placeholder(comfy, concepts, placeholders, text, message):
    _, conditioning, _, clip = comfy
    with pytest.raises(pack_module("datencoder_core").DATEncoderError, match=message):
        conditioning.encode_with_concepts(clip, text, list(zip(placeholders, concepts)))


def test_concepts_for_different_base_models_are_refused(comfy, concepts):
    patching, conditioning, patcher, clip = comfy
    error = pack_module("datencoder_core").DATEncoderError
    foreign = dataclasses.replace(concepts[1], base_fingerprint="0123456789abcdef")
    with pytest.raises(error, match=r"the concept with nearest word 'backpack</w>' \(encoder enc@test\) for 'S2\*' "
                                    r"was made for another base model \(fingerprint 0123456789abcdef\) than the base "
                                    r"model of the concept with nearest word 'dog</w>' \(encoder enc@test\) for 'S1\*', "
                                    r"which it is used with \(fingerprint \w+\)\. Use it with the SD1.x checkpoint"):
        conditioning.encode_with_concepts(clip, TEXT, [("S1*", concepts[0]), ("S2*", foreign)])
    with pytest.raises(error, match=r"was made for another base model \(fingerprint 0123456789abcdef\) than this "
                                    r"MODEL, which it is used with"):
        patching.patch_model(patching.patch_model(patcher, concepts[0], 0.25), foreign, 0.25)


def test_stacking_with_another_alpha_is_refused(comfy, concepts):
    patching, _, patcher, _ = comfy
    with pytest.raises(pack_module("datencoder_core").DATEncoderError,
                       match="already samples 1 concept\\(s\\) at alpha_blend 0.25; .* set this .* to 0.25"):
        patching.patch_model(patching.patch_model(patcher, concepts[0], 0.25), concepts[1], 0.5)


def test_a_mask_of_the_wrong_batch_size_is_refused(comfy, concepts):
    patching, conditioning, patcher, clip = comfy
    cond = conditioning.encode_with_concepts(clip, TEXT, list(zip(["S1*", "S2*"], concepts)))
    model = patching.patch_model(patching.patch_model(patcher, concepts[0], 0.25), concepts[1], 0.25,
                                 mask=torch.ones(3, 128, 128))
    latents, t = _latents()
    with pytest.raises(pack_module("datencoder_core").DATEncoderError,
                       match="mask of concept 2 .* a batch of 3, the latent batch is 2"):
        with torch.no_grad():
            comfy_noise_prediction(model, [cond], latents, t)


def test_the_nodes_chain_concept_lists_and_dual_path_patches(comfy, concepts):
    """Concept List -> Concept List -> Apply Concept Token's more_concepts encodes the same as the function
    with the three pairs in that order; two chained Dual-Path Model Patches hold both concepts and masks."""
    from comfy.patcher_extension import WrappersMP

    patching, conditioning, patcher, clip = comfy
    nodes = pack_module("nodes.nodes")
    third = _concept(comfy, 4, "hat")
    (first_list,) = nodes.DATEncoderConceptList.execute(concepts[1], "S2*").result
    (both,) = nodes.DATEncoderConceptList.execute(third, "S3*", first_list).result
    assert [p for p, _ in both] == ["S2*", "S3*"]
    text = "S1* and S2* with S3*"
    (cond,) = nodes.DATEncoderApplyConceptToken.execute(clip, concepts[0], text, "S1*", both).result
    [[expected, extras]] = conditioning.encode_with_concepts(clip, text, [("S1*", concepts[0]), *both])
    assert torch.equal(cond[0][0], expected) and torch.equal(cond[0][1][patching.HARD_CONTEXT_KEY],
                                                             extras[patching.HARD_CONTEXT_KEY])
    (once,) = nodes.DATEncoderDualPathPatch.execute(patcher, concepts[0], 0.25, 1.0).result
    (twice,) = nodes.DATEncoderDualPathPatch.execute(once, concepts[1], 0.25, 0.5, _left_half()).result
    [wrapper] = twice.get_wrappers(WrappersMP.APPLY_MODEL, patching.WRAPPER_KEY)
    assert [c.mask is None for c in wrapper.concepts] == [True, False]
    assert [c.lora.scale for c in wrapper.concepts] == [concepts[0].lora.scale, 0.5 * concepts[1].lora.scale]
    [untouched] = once.get_wrappers(WrappersMP.APPLY_MODEL, patching.WRAPPER_KEY)
    assert len(untouched.concepts) == 1  # stacking left its input MODEL as it was
    assert nodes.DATEncoderConceptList.validate_inputs(" ") == ("the placeholder is empty; use a word such as S* "
                                                               "(or S1*, S2*)")
