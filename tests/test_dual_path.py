"""Eq. 5 on the diffusers reference backend, against independently built references."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from datencoder_core import DualPathState, LoRAFactors, dual_path_attention

PROMPT = "a photo of {} in the snow"


def _base_unet(unet):
    """An untouched copy of the UNet with diffusers' own attention processor."""
    reference = copy.deepcopy(unet)
    reference.set_attn_processor(AttnProcessor2_0())
    return reference


def _merged_unet(unet, lora):
    """Plain LoRA: W + scale * B @ A written into a copy's weights."""
    merged = _base_unet(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for site, a in lora.down.items():
            modules[site].weight += lora.scale * lora.up[site] @ a
    return merged


def _random_lora(sites, rank=4, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    down = {s.name: torch.randn(*batch, rank, s.in_features, generator=g) * 0.1 for s in sites}
    up = {s.name: torch.randn(*batch, s.out_features, rank, generator=g) * 0.1 for s in sites}
    return LoRAFactors(down, up, 1.0)


@pytest.fixture(scope="module")
def inputs(tiny_models, backend):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    timesteps = torch.tensor([10, 700])
    token = 70
    v_star = torch.randn(backend.token_embeddings.shape[1], generator=g) * 0.5
    soft = backend.encode_prompt(PROMPT, token, v_star).expand(2, -1, -1)
    hard = backend.encode_prompt(PROMPT, token).expand(2, -1, -1)
    return latents, timesteps, soft, hard


def test_soft_and_hard_contexts_differ_only_through_the_slot(inputs):
    _, _, soft, hard = inputs
    assert not torch.allclose(soft, hard)
    slot = 1 + len("a photo of".replace(" ", ""))  # byte-level tokenizer: one token per character
    assert torch.equal(soft[:, :slot], hard[:, :slot])  # causal text encoder: tokens before the slot agree


def test_alpha_one_equals_plain_lora_with_soft_prompt(tiny_models, backend, inputs):
    latents, t, soft, hard = inputs
    lora = _random_lora(backend.sites)
    with torch.no_grad():
        dual = backend.predict_noise(latents, t, soft, DualPathState(lora, 1.0, hard))
        plain = _merged_unet(tiny_models.unet, lora)(latents, t, encoder_hidden_states=soft).sample
    assert torch.allclose(dual, plain, atol=1e-5), (dual - plain).abs().max()


def test_alpha_zero_equals_untouched_unet_with_hard_prompt(tiny_models, backend, inputs):
    latents, t, soft, hard = inputs
    lora = _random_lora(backend.sites)
    with torch.no_grad():
        dual = backend.predict_noise(latents, t, soft, DualPathState(lora, 0.0, hard))
        base = _base_unet(tiny_models.unet)(latents, t, encoder_hidden_states=hard).sample
    assert torch.allclose(dual, base, atol=1e-5), (dual - base).abs().max()


def test_zero_lora_and_hard_token_embedding_equal_untouched_unet(tiny_models, backend, inputs):
    latents, t, _, hard = inputs
    token = 70
    soft = backend.encode_prompt(PROMPT, token, backend.token_embeddings[token]).expand(2, -1, -1)
    zero = _random_lora(backend.sites)
    zero.up = {k: torch.zeros_like(v) for k, v in zero.up.items()}
    with torch.no_grad():
        dual = backend.predict_noise(latents, t, soft, DualPathState(zero, 0.25, hard))
        base = _base_unet(tiny_models.unet)(latents, t, encoder_hidden_states=hard).sample
    assert torch.allclose(dual, base, atol=1e-5), (dual - base).abs().max()


def test_intermediate_alpha_is_between_and_differs(backend, inputs):
    latents, t, soft, hard = inputs
    lora = _random_lora(backend.sites)
    with torch.no_grad():
        outs = [backend.predict_noise(latents, t, soft, DualPathState(lora, a, hard)) for a in (0.0, 0.25, 1.0)]
    assert not torch.allclose(outs[1], outs[0], atol=1e-4) and not torch.allclose(outs[1], outs[2], atol=1e-4)


def test_installed_processor_without_state_is_plain_attention(tiny_models, inputs):
    latents, t, soft, _ = inputs
    with torch.no_grad():
        ours = tiny_models.unet(latents, t, encoder_hidden_states=soft).sample
        theirs = _base_unet(tiny_models.unet)(latents, t, encoder_hidden_states=soft).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_batched_factors_give_each_row_its_own_concept(backend, inputs):
    """Pretraining: one concept per batch row, in one call, equals one call per row."""
    latents, t, soft, hard = inputs
    lora = _random_lora(backend.sites, batch=(2,), seed=5)
    with torch.no_grad():
        together = backend.predict_noise(latents, t, soft, DualPathState(lora, 0.25, hard))
        apart = [backend.predict_noise(latents[i:i + 1], t[i:i + 1], soft[i:i + 1],
                                       DualPathState(lora.row(i), 0.25, hard[i:i + 1])) for i in range(2)]
    assert torch.allclose(together, torch.cat(apart), atol=1e-5)


def _attention_float64(q, k, v, heads):
    n, t, c = q.shape
    q, k, v = (x.double().reshape(n, -1, heads, c // heads).transpose(1, 2) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, t, c)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.7, 1.0])
def test_dual_path_kernel_is_eq5(alpha):
    g = torch.Generator().manual_seed(1)
    soft = (torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g))
    hard = (torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g))
    expected = alpha * _attention_float64(*soft, 4) + (1 - alpha) * _attention_float64(*hard, 4)
    assert torch.allclose(dual_path_attention(soft, hard, 4, alpha).double(), expected, atol=1e-5)


def test_remove_restores_original_processors():
    from training.models.reference import build_random_models

    models = build_random_models("tiny", seed=1)
    before = {k: type(p) for k, p in models.unet.attn_processors.items()}
    backend = models.backend()
    assert {type(p).__name__ for p in models.unet.attn_processors.values()} == {"DualPathAttnProcessor"}
    backend.remove()
    assert {k: type(p) for k, p in models.unet.attn_processors.items()} == before


def test_a_concept_mask_follows_the_unets_rounding_at_every_resolution():
    """A 9x7 latent: the UNet's levels are 9x7, 5x4, 3x2, 2x1 (stride-2 convolutions round up)."""
    from datencoder_core import DATEncoderError
    from datencoder_core.attention import mask_at

    mask = torch.zeros(1, 1, 9, 7)
    mask[..., :4] = 1.0
    assert torch.equal(mask_at(mask, 63), mask.flatten(1).unsqueeze(-1))
    assert [mask_at(mask, tokens).shape[1] for tokens in (20, 6, 2)] == [20, 6, 2]
    assert mask_at(mask, 2).flatten().tolist() == pytest.approx([4 / 7, 4 / 7])  # 2 rows x 1 column: area average
    with pytest.raises(DATEncoderError, match="matches no attention resolution of 50 tokens"):
        mask_at(mask, 50)
