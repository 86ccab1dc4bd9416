"""The reference backend on diffusers / transformers / open_clip modules (used by training, the demo,
the benchmark and the tests; ComfyUI's backend is checked against it).

It is duck-typed: it takes the modules and calls their methods, so this file imports none of those
libraries. Construction freezes every module (``requires_grad_(False)``) and installs one
``DualPathAttnProcessor`` per attention module of the UNet; ``remove()`` restores the original
processors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .attention import DualPathState, dual_path_processors
from .config import LoRAConfig
from .images import clip_preprocess, vae_preprocess
from .prompts import PromptIds, TokenizerSpec, prompt_ids
from .sites import discover_sites


def vae_latents(vae: nn.Module, images: Tensor, image_size: int) -> Tensor:
    """SD's latents of ``images`` (N, H, W, 3) in [0, 1]: the diffusers VAE's posterior mean at ``image_size``,
    times its ``scaling_factor``. The one formula, so cached latents (``training.cache_latents``) equal what
    the backend computes."""
    pixels = vae_preprocess(images.to(vae.device), image_size).to(vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


class DiffusersReferenceBackend:
    """``PersonalizationBackend`` over a diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``, a
    transformers ``CLIPTextModel`` + ``CLIPTokenizer``, and an open_clip ``VisionTransformer``."""

    def __init__(self, unet, vae, text_encoder, tokenizer, vision_tower: nn.Module, alphas_cumprod: Tensor,
                 lora_config: LoRAConfig = LoRAConfig(), image_size: int = 512):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.vision_tower, self.image_size = vision_tower, image_size
        for module in (unet, vae, text_encoder, vision_tower):
            module.requires_grad_(False)
        self.device = unet.device
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.sites = discover_sites(unet.named_modules(), lora_config.targets)
        self.token_embeddings = text_encoder.get_input_embeddings().weight
        self.special_token_ids = tuple(sorted({tokenizer.bos_token_id, tokenizer.eos_token_id}))
        self._original_processors = unet.attn_processors
        unet.set_attn_processor(dual_path_processors(list(self._original_processors), self.sites))
        self._empty_context = None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._tokenizer_spec = TokenizerSpec(lambda text: tokenizer(text, add_special_tokens=False).input_ids,
                                             tokenizer.bos_token_id, tokenizer.eos_token_id, pad,
                                             text_encoder.config.max_position_embeddings)

    def remove(self) -> None:
        """Put the UNet's original attention processors back."""
        self.unet.set_attn_processor(self._original_processors)

    def encode_latents(self, images: Tensor) -> Tensor:
        return vae_latents(self.vae, images, self.image_size)

    def image_features(self, images: Tensor, noisy_latents: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        return self._clip_tokens(images), self._unet_mid_features(noisy_latents, timesteps)

    def _clip_tokens(self, images: Tensor) -> Tensor:
        return open_clip_tokens(self.vision_tower, images.to(self.device))

    def _unet_mid_features(self, noisy_latents: Tensor, timesteps: Tensor) -> Tensor:
        """The encoder half of ``UNet2DConditionModel.forward`` (time embedding, conv_in, down blocks,
        mid block) with the empty prompt and no processors' state, i.e. the base UNet."""
        unet = self.unet
        if self._empty_context is None:
            self._empty_context = self._encode_ids([list(self.prompt_ids("").ids)])
        context = self._empty_context.expand(noisy_latents.shape[0], -1, -1)
        emb = unet.time_embedding(unet.get_time_embed(sample=noisy_latents, timestep=timesteps))
        h = unet.conv_in(noisy_latents)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(h, temb=emb)
        return unet.mid_block(h, emb, encoder_hidden_states=context)

    def prompt_ids(self, template: str) -> PromptIds:
        return prompt_ids(template, self._tokenizer_spec)

    def _encode_ids(self, ids: list[list[int]], slots: list[int | None] | None = None,
                    embeddings: Tensor | None = None) -> Tensor:
        """Text contexts (B, S, D) of B id rows; with ``embeddings`` (B, D), row i's token at ``slots[i]``
        is replaced by ``embeddings[i]`` (differentiable)."""
        ids = torch.tensor(ids, device=self.device)
        if embeddings is None:
            return self.text_encoder(ids).last_hidden_state
        table = self.text_encoder.get_input_embeddings()
        mask = torch.zeros(*ids.shape, 1, dtype=torch.bool, device=self.device)  # (B, S, 1)
        for row, slot in enumerate(slots):
            if slot is not None:
                mask[row, slot] = True

        def put_embeddings(_module, _inputs, out):  # out-of-place, so the gradient reaches ``embeddings``
            return torch.where(mask, embeddings[:, None, :].to(out.dtype), out)

        hook = table.register_forward_hook(put_embeddings)
        try:
            return self.text_encoder(ids).last_hidden_state
        finally:
            hook.remove()

    def encode_prompt(self, prompt: str | PromptIds, token_id: int, embedding: Tensor | None = None) -> Tensor:
        prompt = self.prompt_ids(prompt) if isinstance(prompt, str) else prompt
        return self.encode_prompts([prompt], [token_id], None if embedding is None else embedding[None])

    def encode_prompts(self, prompts: Sequence[PromptIds], token_ids: Sequence[int],
                       embeddings: Tensor | None = None) -> Tensor:
        """``encode_prompt`` for a batch of concepts (pretraining: one concept per row): (B, S, D), row i
        from ``prompts[i]`` with ``token_ids[i]`` in its slot, or ``embeddings[i]`` (B, D) in its place."""
        return self._encode_ids([p.with_token(t) for p, t in zip(prompts, token_ids, strict=True)],
                                [p.slot for p in prompts], embeddings)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id)

    def word_token_ids(self, word: str) -> list[int]:
        return list(self.tokenizer(word, add_special_tokens=False).input_ids)

    def predict_noise(self, noisy_latents: Tensor, timesteps: Tensor, context: Tensor,
                      dual_path: DualPathState) -> Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=context,
                         cross_attention_kwargs={"datencoder": dual_path}).sample


def open_clip_tokens(vision_tower: nn.Module, images: Tensor) -> Tensor:
    """CLIP tokens by the feature contract from an open_clip ``VisionTransformer``: (B, 1 + g*g, C),
    taken with a hook BEFORE ``ln_post`` (open_clip's own ``output_tokens`` come after it), from the
    same preprocessing as ComfyUI's ``clip_preprocess``."""
    captured = []
    hook = vision_tower.transformer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        pixels = clip_preprocess(images, vision_tower.image_size[0])
        vision_tower(pixels.to(next(vision_tower.parameters())))
    finally:
        hook.remove()
    return captured[0]
