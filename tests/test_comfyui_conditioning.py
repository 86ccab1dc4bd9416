"""Apply Concept Token's encoding, checked against ComfyUI's own text encoding."""

import pytest
import torch
from training.headless.comfyui import pack_module
from training.headless.random_models import random_comfy_clip

from datencoder_core import LoRAFactors


@pytest.fixture(scope="module")
def clip():
    return random_comfy_clip()


@pytest.fixture(scope="module")
def conditioning():
    return pack_module("nodes.conditioning")


def _concept(clip, token_id, v_star):
    core = pack_module("datencoder_core")
    site = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = LoRAFactors({site: torch.zeros(4, 8)}, {site: torch.zeros(8, 4)}, 1.0)
    return core.Concept(v_star, lora, token_id, "cat</w>", "fingerprint", "enc", core.TuningConfig(), ("attn1.to_q",))


def _plain(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


@pytest.mark.parametrize("text", ["a photo of S* in the snow", "S* and S* on a (sofa:1.2)"])
def test_concept_of_a_real_word_equals_writing_the_word(clip, conditioning, text):
    [cat] = conditioning.placeholder_ids(clip, "cat")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    concept = _concept(clip, cat, table[cat].detach().clone())
    [[soft, extras]] = conditioning.encode_with_concepts(clip, text, [("S*", concept)])
    expected, pooled = _plain(clip, text.replace("S*", "cat"))
    assert torch.allclose(soft, expected, atol=1e-5)
    assert torch.allclose(extras["pooled_output"], pooled, atol=1e-5)
    assert torch.allclose(extras[pack_module("nodes.patching").HARD_CONTEXT_KEY], expected, atol=1e-5)


def test_soft_and_hard_prompts_differ_from_the_concept_token_on(clip, conditioning):
    [cat] = conditioning.placeholder_ids(clip, "cat")
    concept = _concept(clip, cat, torch.randn(32))
    [[soft, extras]] = conditioning.encode_with_concepts(clip, "a photo of S* in the snow", [("S*", concept)])
    hard = extras[pack_module("nodes.patching").HARD_CONTEXT_KEY]
    slot = 4  # start, a, photo, of, S*
    assert torch.equal(soft[:, :slot], hard[:, :slot])  # causal text encoder
    assert not torch.allclose(soft[:, slot:], hard[:, slot:], atol=1e-4)


@pytest.mark.parametrize("text,message", [
    ("a photo of a dog", "does not contain the placeholder 'S\\*'"),
    ("a photo of xS*y", "tokenizes differently; put spaces around it"),
])
def test_missing_or_glued_placeholder_is_a_clear_error(clip, conditioning, text, message):
    error = pack_module("datencoder_core").DATEncoderError
    with pytest.raises(error, match=message):
        conditioning.encode_with_concepts(clip, text, [("S*", _concept(clip, 1, torch.randn(32)))])
