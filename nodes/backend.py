"""The ComfyUI backend of ``datencoder_core.backend.PersonalizationBackend``, for tuning inside ComfyUI.

ComfyUI runs nodes under ``torch.inference_mode()`` and loads weights as inference tensors, which
autograd refuses to save for backward; its CLIP layers also add residuals in place (after LayerNorm
has saved the tensor). So, built under ``torch.inference_mode(False)``, the backend takes private,
frozen copies of the UNet and of the CLIP-L text model (the input MODEL and CLIP are never touched):
* the UNet copy gets the same ``DualPathAttentionPatch`` per attention module as sampling does;
* the text copy runs an out-of-place forward of ComfyUI's own layers (embeddings, causal encoder,
  final LayerNorm: SD1.x's last layer), so the gradient reaches the soft token.
The VAE and the CLIP vision model are used through ComfyUI's APIs, without gradients.
"""

from __future__ import annotations

import copy

import comfy.model_management
import torch
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from torch import Tensor

from ..datencoder_core import DATEncoderError, DualPathState
from ..datencoder_core.attention import sites_by_attention
from ..datencoder_core.images import vae_preprocess
from .conditioning import placeholder_ids, replace_placeholder
from .patching import STATE_KEY, DualPathAttentionPatch, comfy_sites

SLOT = "S*"  # the tuning prompt's placeholder, replaced by one token


class ComfyUIBackend:
    def __init__(self, model, clip, vae, clip_vision, image_size: int = 512):
        if torch.is_inference_mode_enabled():
            raise RuntimeError("build ComfyUIBackend under torch.inference_mode(False)")
        self.vae, self.clip_vision, self.clip, self.image_size = vae, clip_vision, clip, image_size
        self.model = model.model
        self.device = model.load_device
        self.dtype = self.model.manual_cast_dtype or self.model.get_dtype()
        comfy.model_management.load_models_gpu([model])
        self.sites, comfy_path = comfy_sites(model)
        self.unet = copy.deepcopy(self.model.diffusion_model).to(self.device).requires_grad_(False)
        for projections in sites_by_attention(self.sites).values():
            path = comfy_path[next(iter(projections.values()))].rsplit(".", 1)[0]
            module = self.unet.get_submodule(path)
            module.forward = DualPathAttentionPatch(module, projections)
        sigmas = self.model.model_sampling.sigmas.float().to(self.device)
        self.alphas_cumprod = 1.0 / (1.0 + sigmas**2)

        clip_l = getattr(clip.cond_stage_model, "clip_l", None)
        if clip_l is None:
            raise DATEncoderError("Personalize Concept needs an SD1.x CLIP (one CLIP-L text encoder)")
        self.text_model = copy.deepcopy(clip_l.transformer.text_model).to(self.device).requires_grad_(False)
        self.token_embeddings = self.text_model.embeddings.token_embedding.weight
        tokenizer = clip.tokenizer.clip_l
        self.special_token_ids = (tokenizer.start_token, tokenizer.end_token)
        self._inv_vocab = tokenizer.inv_vocab
        self._empty_context = self._encode_ids(self._ids("", None)[0])

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        pixels = (vae_preprocess(images, self.image_size).movedim(1, -1) + 1.0) / 2.0  # (B, H, W, 3) in [0, 1]
        latents = self.model.process_latent_in(self.vae.encode(pixels))
        return latents.clone().to(self.device, torch.float32)

    @torch.no_grad()
    def image_features(self, images: Tensor, noisy_latents: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.clip_vision.encode_image(images)["last_hidden_state"].clone().to(self.device)
        unet = self.unet
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(self.dtype))
        context = self._empty_context.expand(noisy_latents.shape[0], -1, -1).to(self.dtype)
        h, options = noisy_latents.to(self.dtype), {}
        for module in unet.input_blocks:
            h = forward_timestep_embed(module, h, emb, context, options)
        return tokens, forward_timestep_embed(unet.middle_block, h, emb, context, options).float()

    def _ids(self, prompt: str, token_id: int | None) -> tuple[list[int], int]:
        """Ids (77) of ``prompt`` with its ``{}`` slot as ``token_id`` (or no slot), and the slot's index."""
        text = prompt.replace("{}", SLOT) if token_id is not None else prompt
        tokens = self.clip.tokenize(text)
        if token_id is not None:
            tokens, _ = replace_placeholder(tokens, placeholder_ids(self.clip, SLOT), token_id)
        chunks = tokens["l"]
        if len(chunks) != 1:
            raise DATEncoderError(f"the tuning prompt {prompt!r} is longer than one 77-token chunk")
        ids = [int(t) for t, *_ in chunks[0]]
        return ids, ids.index(token_id) if token_id is not None else -1

    def _encode_ids(self, ids: list[int], slot: int = -1, embedding: Tensor | None = None) -> Tensor:
        """SD1.x text context (1, 77, D) in float32; out-of-place, so ``embedding`` gets a gradient."""
        text = self.text_model
        ids_tensor = torch.tensor([ids], device=self.device)
        x = text.embeddings.token_embedding.weight[ids_tensor].float()
        if embedding is not None:
            mask = torch.zeros(x.shape[1], 1, dtype=torch.bool, device=x.device)
            mask[slot] = True
            x = torch.where(mask, embedding.float(), x)
        x = x + text.embeddings.position_embedding.weight.float()
        causal = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, device=x.device).triu_(1)
        attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
        for layer in text.encoder.layers:
            x = x + layer.self_attn(layer.layer_norm1(x), causal, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
        return text.final_layer_norm(x)

    def encode_prompt(self, prompt: str, token_id: int, embedding: Tensor | None = None) -> Tensor:
        ids, slot = self._ids(prompt, token_id)
        return self._encode_ids(ids, slot, embedding)

    def decode_token(self, token_id: int) -> str:
        return self._inv_vocab[token_id]

    def predict_noise(self, noisy_latents: Tensor, timesteps: Tensor, context: Tensor,
                      dual_path: DualPathState) -> Tensor:
        state = DualPathState(dual_path.lora, dual_path.alpha, dual_path.hard_context.to(self.dtype))
        out = self.unet(noisy_latents.to(self.dtype), timesteps.float(), context=context.to(self.dtype),
                        transformer_options={STATE_KEY: state})
        return out.float()
