"""The ComfyUI backend of ``datencoder_core.backend.PersonalizationBackend``, for tuning inside ComfyUI.

No second copy of any model: the UNet and the CLIP-L text model are the ones ComfyUI loaded, moved
and offloaded by ``comfy.model_management`` (``load_models_gpu(..., force_full_load=True)``, as
ComfyUI's own trainer loads), together with the encoder's ModelPatcher.
* ComfyUI loads weights as inference tensors, which autograd refuses to save for backward. Tuning
  runs its forwards under ``datencoder_core.frozen.frozen_weights``: linear, conv and norm ops keep a
  reference to their frozen weight and save only activations, so the gradient reaches v*, A and B
  without copying a weight (a deep copy would double the UNet's memory behind ComfyUI's back).
* The UNet runs through a ModelPatcher clone whose attention modules carry the same
  ``DualPathAttentionPatch`` as sampling (``patching.with_dual_path_attention``), with the
  ``transformer_options`` sampling gives it (``tuning_transformer_options``): the MODEL's own
  (other packs' attn1/attn2 patches), so tuning fits the concept to the model that will sample it.
* ComfyUI's CLIP layers add residuals in place (after LayerNorm has saved the tensor), so the text
  model runs an out-of-place forward of ComfyUI's own layers (embeddings, causal layers up to the CLIP
  skip that CLIPSetLastLayer set, final LayerNorm), and the gradient reaches the soft token.
The VAE and the CLIP vision model are used through ComfyUI's APIs, without gradients.

This module is the one place that reaches past ComfyUI's public node and patcher API, because autograd
needs the forwards that ComfyUI only offers under ``no_grad`` or with in-place ops: the text layers
(``_encode_ids``), the UNet's forward with its ``transformer_options`` (``predict_noise``), and its input
and middle blocks (``image_features``). They stay here, beside the one class that calls them, rather than
in a separate internals module: a ComfyUI change that breaks one of them breaks this file alone, and
``tests/test_comfyui_backend.py`` pins each against the diffusers reference and ComfyUI's own sampling.
"""

from __future__ import annotations

import uuid

import comfy.model_management
import comfy.model_sampling
import comfy.supported_models
import torch
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from comfy.patcher_extension import merge_nested_dicts
from torch import Tensor

from ..datencoder_core import DATEncoderError, DualPathState
from ..datencoder_core.frozen import frozen_weights
from ..datencoder_core.images import to_rgb, vae_preprocess
from ..datencoder_core.prompts import PromptIds, TokenizerSpec, prompt_ids
from .conditioning import placeholder_ids
from .patching import STATE_KEY, refuse_attn2_replace, with_dual_path_attention


def check_sd1(model, clip) -> None:
    """Refuse, naming what was found, a MODEL or CLIP that is not SD1.x (before anything is loaded)."""
    config = model.model.model_config
    if not isinstance(config, comfy.supported_models.SD15):
        raise DATEncoderError(f"this MODEL is {type(config).__name__}; DATEncoder works with SD1.x checkpoints "
                              f"(e.g. v1-5-pruned-emaonly.safetensors)")
    encoders = sorted(clip.tokenize(""))
    if encoders != ["l"]:
        raise DATEncoderError(f"this CLIP has the text encoders {encoders} (an SDXL-style CLIP has ['g', 'l']); "
                              f"DATEncoder needs an SD1.x CLIP (one CLIP-L): use the CLIP of the SD1.x checkpoint")


def eps_sigmas(model) -> Tensor:
    """The discrete schedule sigma_t (1000,) of an eps-prediction model, from its ``model_sampling`` object
    (which ModelSamplingDiscrete nodes may have replaced); abar_t = 1 / (1 + sigma_t^2)."""
    sampling = model.get_model_object("model_sampling")
    # The prediction type is how the sampler reads the model output: EPS's calculate_denoised, not an override.
    if type(sampling).calculate_denoised is not comfy.model_sampling.EPS.calculate_denoised or not hasattr(
            sampling, "sigmas"):
        raise DATEncoderError(f"this MODEL samples as {type(sampling).__name__}; DATEncoder is trained for "
                              f"eps-prediction SD1.x (discrete schedule): remove the ModelSampling node or use "
                              f"an eps checkpoint")
    return sampling.sigmas.float()


def tuning_transformer_options(patcher, sigmas: Tensor, conditioning: uuid.UUID, state: DualPathState) -> dict:
    """The ``transformer_options`` of one tuning forward: those sampling gives the UNet for a batch of one
    positive conditioning (``comfy.samplers._calc_cond_batch``): the MODEL's
    ``model_options["transformer_options"]`` (other packs' ``attn1_patch``, ``attn2_patch``,
    ``attn2_output_patch``, ...) merged into a fresh dict by ComfyUI's ``merge_nested_dicts``, then
    ``cond_or_uncond``, ``uuids`` and ``sigmas`` (one per row, what patches that act on part of the
    schedule read), and the ``DualPathState``. The patcher's wrappers and callbacks are not added: they
    belong to sampling's lifecycle (the outer-sample and prepare-sampling steps that set them up never
    run while tuning)."""
    options = merge_nested_dicts({}, patcher.model_options.get("transformer_options", {}))
    options.update({"cond_or_uncond": [0], "uuids": [conditioning], "sigmas": sigmas, STATE_KEY: state})
    return options


class ComfyUIBackend:
    """Tuning on the MODEL and CLIP ComfyUI loaded; ``extra_models`` (the encoder's ModelPatcher) are
    loaded with them. ``clip_vision`` None: no encoder (Personalize Concept (no encoder)), so no
    ``image_features``; ``node`` names the node in messages."""

    def __init__(self, model, clip, vae, clip_vision=None, image_size: int = 512, extra_models=(),
                 node: str = "Personalize Concept"):
        check_sd1(model, clip)
        refuse_attn2_replace(model.model_options.get("transformer_options", {}), node)
        self.vae, self.clip, self.clip_vision, self.image_size = vae, clip, clip_vision, image_size
        self.patcher, self.sites = with_dual_path_attention(model)
        self.models = [self.patcher, clip.patcher, *extra_models]
        self.device = model.load_device
        self.dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        self.sigmas = eps_sigmas(model).to(self.device)
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas**2)
        self._conditioning = uuid.uuid4()  # the tuning prompt's id in transformer_options["uuids"]

        self.text_model = clip.cond_stage_model.clip_l.transformer.text_model
        empty = [int(t) for t, *_ in clip.tokenize("")["l"][0]]  # start, end, padding
        self._tokenizer = TokenizerSpec(lambda text: placeholder_ids(clip, text), empty[0], empty[1], empty[2],
                                       len(empty))
        self.special_token_ids = (empty[0], empty[1])
        self._inv_vocab = clip.tokenizer.clip_l.inv_vocab
        self._layers = self._text_layers(clip.layer_idx, len(self.text_model.encoder.layers))
        self._empty_context: Tensor | None = None

    @staticmethod
    def _text_layers(layer_idx: int | None, count: int) -> int:
        """How many text layers run: all, or up to CLIPSetLastLayer's ``layer_idx`` (-1 = last, -2 = the
        one before, ...), as ComfyUI's SDClipModel reads it."""
        if layer_idx is None or abs(layer_idx) > count:
            return count
        return (count + layer_idx if layer_idx < 0 else layer_idx) + 1

    def _load(self) -> None:
        comfy.model_management.load_models_gpu(self.models, force_full_load=True)

    @property
    def token_embeddings(self) -> Tensor:
        return self.text_model.embeddings.token_embedding.weight

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        pixels = (vae_preprocess(images, self.image_size).movedim(1, -1) + 1.0) / 2.0  # (B, H, W, 3) in [0, 1]
        latents = self.patcher.model.process_latent_in(self.vae.encode(pixels))
        return latents.clone().to(self.device, torch.float32)

    @torch.no_grad()
    def image_features(self, images: Tensor, noisy_latents: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's inputs: CLIP vision tokens and the UNet's middle-block features at the empty prompt.
        The UNet runs without the MODEL's transformer_options: the encoder was pretrained on the plain
        UNet's features, and no sampling step computes these."""
        # ComfyUI drops an alpha channel (its clip_preprocess keeps [..., :3]); composite it as the VAE path does
        tokens = self.clip_vision.encode_image(to_rgb(images))["last_hidden_state"].clone().to(self.device)
        self._load()  # after CLIP vision, which may have offloaded them; tuning follows with them loaded
        unet = self.patcher.model.diffusion_model
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(self.dtype))
        context = self._empty().expand(noisy_latents.shape[0], -1, -1).to(self.dtype)
        h, options = noisy_latents.to(self.dtype), {}
        for module in unet.input_blocks:
            h = forward_timestep_embed(module, h, emb, context, options)
        return tokens, forward_timestep_embed(unet.middle_block, h, emb, context, options).float()

    def _empty(self) -> Tensor:
        if self._empty_context is None:
            with torch.no_grad():
                self._empty_context = self._encode_ids(list(self.prompt_ids("").ids))
        return self._empty_context

    def prompt_ids(self, template: str) -> PromptIds:
        return prompt_ids(template, self._tokenizer)

    def _encode_ids(self, ids: list[int], slot: int | None = None, embedding: Tensor | None = None) -> Tensor:
        """SD1.x text context (1, 77, D) in float32 on the UNet's device; out-of-place, so ``embedding``
        gets a gradient."""
        self._load()
        text = self.text_model
        table = text.embeddings.token_embedding.weight
        x = table[torch.tensor([ids], device=table.device)].float()
        if embedding is not None:
            mask = torch.zeros(x.shape[1], 1, dtype=torch.bool, device=x.device)
            mask[slot] = True
            x = torch.where(mask, embedding.to(x.device, x.dtype), x)
        x = x + text.embeddings.position_embedding.weight.to(x.device, x.dtype)
        causal = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, device=x.device).triu_(1)
        attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
        with frozen_weights():
            for layer in text.encoder.layers[:self._layers]:
                x = x + layer.self_attn(layer.layer_norm1(x), causal, attention)
                x = x + layer.mlp(layer.layer_norm2(x))
            return text.final_layer_norm(x).to(self.device)

    def encode_prompt(self, prompt: str | PromptIds, token_id: int, embedding: Tensor | None = None) -> Tensor:
        prompt = self.prompt_ids(prompt) if isinstance(prompt, str) else prompt
        return self._encode_ids(prompt.with_token(token_id), prompt.slot, embedding)

    def decode_token(self, token_id: int) -> str:
        return self._inv_vocab[token_id]

    def word_token_ids(self, word: str) -> list[int]:
        """By ComfyUI's CLIP tokenizer, the one sampling's prompts go through; a blank word gives []."""
        return placeholder_ids(self.clip, word) if word.strip() else []

    def predict_noise(self, noisy_latents: Tensor, timesteps: Tensor, context: Tensor,
                      dual_path: DualPathState) -> Tensor:
        self._load()
        state = DualPathState(dual_path.lora, dual_path.alpha, dual_path.hard_context.to(self.dtype))
        options = tuning_transformer_options(self.patcher, self.sigmas[timesteps], self._conditioning, state)
        with frozen_weights():
            out = self.patcher.model.diffusion_model(noisy_latents.to(self.dtype), timesteps.float(),
                                                     context=context.to(self.dtype), transformer_options=options)
        return out.float()
