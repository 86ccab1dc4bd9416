"""The dual path (Eq. 5) on a ComfyUI ``ModelPatcher`` clone, for sampling with a concept.

Host hooks, all on a clone so the input MODEL is never changed, all ComfyUI's public patcher API:
* object patch ``diffusion_model.<attention>.forward`` per SD1.x attention module -> ``DualPathAttentionPatch``
  (``attn*_replace`` patches only see projections made with the base weights, so they cannot carry
  the LoRA; see DESIGN.md);
* ``WrappersMP.PREPARE_SAMPLING`` -> ``add_hard_contexts``: every conditioning gets its hard context as
  a model cond (``HARD_CONTEXT_KEY``): the one "Apply Concept Token" attached, else its own prompt
  (a negative prompt has no concept). Positive and negative then have the same model-cond keys, so
  ComfyUI batches them into ONE UNet call per step (``samplers.cond_equal_size``);
* ``WrappersMP.APPLY_MODEL`` -> ``DualPathWrapper``: per model call, takes the batched hard context out
  of the model inputs and puts a ``DualPathState`` into ``transformer_options``.

Several concepts: applying the patch to an already patched MODEL adds the concept, as IPAdapter's
``Attn2Replace.add`` stacks: the clone's ``DualPathWrapper`` is replaced by one holding every concept so
far, each with its strength and optional mask; the attention patches stay. The semantics (soft path
W + sum_i s_i dW_i, masked offsets only on the queries inside their mask, hard path W, one alpha) are in
``datencoder_core.attention``. With one concept and no mask the state holds that concept's factors
alone, so the output is bit for bit the one-concept output.

Other packs' attention patches: ``attn1_patch`` / ``attn2_patch`` (which edit the attention inputs
before it runs) work together with the dual path, as long as they keep the value equal to the
context and the context's shape; tuning gets the same patches (``backend.tuning_transformer_options``),
so Personalize Concept fits the concept to the model that samples it. An ``attn2_replace`` patch
(IPAdapter's way) replaces the cross-attention call and would drop the dual path there, so it is
refused (``refuse_attn2_replace``): when the patch is applied, when sampling, and when tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.conds
import comfy.utils
import torch
import torch.nn.functional as F
from comfy.patcher_extension import WrappersMP
from ..datencoder_core import (Concept, DATEncoderError, DualPathState, LoRAConfig, LoRAFactors, LoRASum, Region,
                               architecture_fingerprint, discover_sites)
from ..datencoder_core.attention import dual_path_forward, sites_by_attention
from ..datencoder_core.checkpoint import check_base_model
from ..datencoder_core.sites import LoRASite

HARD_CONTEXT_KEY = "datencoder_hard_context"  # conditioning key set by "Apply Concept Token"; a model cond in sampling
STATE_KEY = "datencoder"  # transformer_options key read by DualPathAttentionPatch
WRAPPER_KEY = "datencoder_dual_path"  # key of this pack's wrappers on a ModelPatcher


def comfy_sites(patcher, lora_config: LoRAConfig = LoRAConfig()) -> tuple[tuple[LoRASite, ...], dict[str, str]]:
    """The model's LoRA sites under canonical (diffusers) names, sorted by name, and canonical -> ComfyUI
    module path, from ComfyUI's own key map (``comfy.utils.unet_to_diffusers``, whose order varies)."""
    key_map = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    comfy_path = {d.removesuffix(".weight"): c.removesuffix(".weight") for d, c in key_map.items()
                  if d.endswith(".weight")}
    modules = dict(patcher.model.diffusion_model.named_modules())
    named = [(name, modules[path]) for name, path in comfy_path.items() if path in modules]
    sites = tuple(sorted(discover_sites(named, lora_config.targets), key=lambda site: site.name))
    return sites, {site.name: comfy_path[site.name] for site in sites}


def model_fingerprint(patcher) -> str:
    """The ``architecture_fingerprint`` of a MODEL: what concepts and encoders made for it record."""
    sites, _ = comfy_sites(patcher)
    return architecture_fingerprint(sites, patcher.model.model_config.unet_config["context_dim"])


def with_dual_path_attention(patcher):
    """A clone of ``patcher`` whose SD1.x attention modules run ``DualPathAttentionPatch`` (object
    patches: applied when ComfyUI loads the clone, removed when it unloads it), and its sites."""
    sites, comfy_path = comfy_sites(patcher)
    clone = patcher.clone()
    diffusion_model = patcher.model.diffusion_model
    for projections in sites_by_attention(sites).values():
        path = comfy_path[next(iter(projections.values()))].rsplit(".", 1)[0]
        clone.add_object_patch(f"diffusion_model.{path}.forward",
                               DualPathAttentionPatch(comfy.utils.get_attr(diffusion_model, path), projections,
                                                      is_cross=path.endswith("attn2")))
    return clone, sites


class DualPathAttentionPatch:
    """Replaces one ``CrossAttention.forward`` (host hook: ``ModelPatcher.add_object_patch``). Runs Eq. 5
    when ``transformer_options`` carries a ``DualPathState``, ComfyUI's own forward otherwise."""

    def __init__(self, module, sites: dict[str, str], is_cross: bool):
        self.module, self.sites, self.is_cross = module, sites, is_cross

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):
        state = transformer_options.get(STATE_KEY)
        if state is None:  # not a concept call: ComfyUI's own forward, untouched
            return type(self.module).forward(self.module, x, context=context, value=value, mask=mask,
                                             transformer_options=transformer_options)
        if mask is not None or (value is not None and value is not context):
            raise DATEncoderError("another node's attention patch passes a separate value or a mask to SD1.x "
                                  "attention, which the dual path (Personalize Concept, Dual-Path Model Patch) "
                                  "cannot combine with; use a MODEL without that patch, or do without the concept")
        if self.is_cross and context.shape != state.hard_context.shape:
            raise DATEncoderError(f"another node's attn2_patch changed the cross-attention context to "
                                  f"{tuple(context.shape)} (the prompt is {tuple(state.hard_context.shape)}); the "
                                  f"dual path (Personalize Concept, Dual-Path Model Patch) cannot combine with it: "
                                  f"use a MODEL without that patch, or do without the concept")
        return dual_path_forward(self.module, x, context, state, self.sites, self.is_cross)


def refuse_attn2_replace(transformer_options: dict, node: str) -> None:
    """Refuse ``transformer_options`` with ``attn2_replace`` patches, which would bypass the dual path of
    ``node`` (sampling: the Dual-Path Model Patch; tuning: Personalize Concept)."""
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    if replaced:
        raise DATEncoderError(f"this MODEL carries attn2_replace patches from another node (e.g. IPAdapter) on "
                              f"{len(replaced)} cross-attention block(s); they replace the cross-attention the "
                              f"dual path runs in, so {node} would silently drop the concept there. Give {node} "
                              f"the MODEL without that node's patches: the two cannot be combined")


def add_hard_contexts(executor, model, noise_shape, conds, *args, **kwargs):
    """``WrappersMP.PREPARE_SAMPLING`` wrapper: every conditioning gets a ``HARD_CONTEXT_KEY`` model cond,
    the hard prompt "Apply Concept Token" attached or, without one, the conditioning's own prompt."""
    conds = {name: [_with_hard_context(cond) for cond in group] for name, group in conds.items()}
    return executor(model, noise_shape, conds, *args, **kwargs)


def _with_hard_context(cond: dict) -> dict:
    context = cond.get("cross_attn")
    hard = cond.get(HARD_CONTEXT_KEY, context)
    if hard is None:
        return cond
    if context is not None and hard.shape != context.shape:
        raise DATEncoderError(f"a conditioning from Apply Concept Token was changed afterwards (its prompt is now "
                              f"{tuple(context.shape)}, the concept's hard prompt {tuple(hard.shape)}), e.g. by "
                              f"ConditioningConcat or ConditioningAverage; the dual path cannot follow that: "
                              f"write the whole prompt into Apply Concept Token instead")
    return {**cond, "model_conds": {**cond.get("model_conds", {}), HARD_CONTEXT_KEY: comfy.conds.CONDCrossAttn(hard)}}


@dataclass(frozen=True)
class PatchedConcept:
    """One concept on a patched model: its factors, scaled by its LoRA strength, and its ComfyUI MASK as
    (B, 1, H, W) floats, or None (its offsets act everywhere)."""

    lora: LoRAFactors
    mask: torch.Tensor | None

    def on(self, device) -> PatchedConcept:
        if next(iter(self.lora.down.values())).device == device:
            return self
        lora = LoRAFactors({k: v.to(device) for k, v in self.lora.down.items()},
                           {k: v.to(device) for k, v in self.lora.up.items()}, self.lora.scale)
        return PatchedConcept(lora, None if self.mask is None else self.mask.to(device))

    def latent_mask(self, x: torch.Tensor, chunks: int, number: int) -> torch.Tensor:
        """The mask at the latent size of ``x`` (N, C, h, w), one row per row of x: x holds ``chunks``
        conditionings (cond, uncond, ...) of the latent batch each; the mask has one row or one per latent."""
        batch = x.shape[0] // chunks
        if self.mask.shape[0] not in (1, batch):
            raise DATEncoderError(f"the mask of concept {number} (Dual-Path Model Patch) has a batch of "
                                  f"{self.mask.shape[0]}, the latent batch is {batch}: give one mask for every image, "
                                  f"or one per image of the batch")
        mask = F.interpolate(self.mask, size=x.shape[-2:], mode="area").to(x.dtype)
        return mask.expand(batch, -1, -1, -1).repeat(chunks, 1, 1, 1)


class DualPathWrapper:
    """``WrappersMP.APPLY_MODEL`` wrapper: gives every model call its ``DualPathState``, with the
    concepts' LoRA factors and masks on the call's device and the hard context batched like the prompt."""

    def __init__(self, concepts: tuple[PatchedConcept, ...], alpha: float):
        self.concepts, self.alpha = concepts, alpha
        self._on_device = concepts

    def add(self, concept: PatchedConcept) -> DualPathWrapper:
        """A wrapper with ``concept`` after this one's (the stacking of a second Dual-Path Model Patch)."""
        return DualPathWrapper((*self.concepts, concept), self.alpha)

    def _state(self, x: torch.Tensor, hard: torch.Tensor, chunks: int) -> DualPathState:
        self._on_device = tuple(concept.on(x.device) for concept in self._on_device)
        everywhere = [concept.lora for concept in self._on_device if concept.mask is None]
        lora = everywhere[0] if len(everywhere) == 1 else LoRASum(tuple(everywhere)) if everywhere else None
        regions = tuple(Region(concept.lora, concept.latent_mask(x, chunks, number))
                        for number, concept in enumerate(self._on_device, 1) if concept.mask is not None)
        return DualPathState(lora, self.alpha, hard, regions)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        hard = kwargs.pop(HARD_CONTEXT_KEY, None)
        if hard is None:
            raise DATEncoderError("the Dual-Path Model Patch got a model call without its hard prompt: sample "
                                  "with one of ComfyUI's sampler nodes (KSampler, SamplerCustom, ...)")
        refuse_attn2_replace(transformer_options, "the Dual-Path Model Patch")
        state = self._state(x, hard, len(transformer_options.get("cond_or_uncond", [None])))
        options = {**transformer_options, STATE_KEY: state}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def _mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK, (H, W) or (B, H, W), as (B, 1, H, W) float32; anything else is refused."""
    if mask.ndim not in (2, 3):
        raise DATEncoderError(f"the mask of Dual-Path Model Patch has the shape {tuple(mask.shape)}; expected a "
                              f"ComfyUI MASK, (height, width) or (batch, height, width), e.g. from Load Image's "
                              f"mask or Solid Mask")
    return mask.reshape(-1, 1, *mask.shape[-2:]).float()


def patch_model(patcher, concept: Concept, alpha: float, lora_strength: float = 1.0,
                mask: torch.Tensor | None = None):
    """A clone of ``patcher`` that samples with ``concept`` through the dual path (Eq. 5), its LoRA offsets
    scaled by ``lora_strength`` and, with a ComfyUI MASK, acting only inside it. A model already patched
    gets the concept added to its concepts (same ``alpha`` required); one with attn2_replace patches, a
    concept for another base model, or one with NaN or inf values (named by its label), is refused."""
    refuse_attn2_replace(patcher.model_options.get("transformer_options", {}), "the Dual-Path Model Patch")
    concept.check_finite()
    check_base_model(concept.label, concept.base_fingerprint, "this MODEL", model_fingerprint(patcher))
    added = PatchedConcept(LoRAFactors(concept.lora.down, concept.lora.up, concept.lora.scale * lora_strength),
                           None if mask is None else _mask_batch(mask))
    stacked = patcher.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    if stacked:
        [previous] = stacked
        if previous.alpha != alpha:
            raise DATEncoderError(f"this MODEL already samples {len(previous.concepts)} concept(s) at alpha_blend "
                                  f"{previous.alpha}; all concepts share one blend: set this Dual-Path Model Patch's "
                                  f"alpha_blend to {previous.alpha} too (or change both)")
        clone = patcher.clone()
        clone.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, previous.add(added))
        return clone
    clone, _ = with_dual_path_attention(patcher)
    clone.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY, add_hard_contexts)
    clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, DualPathWrapper((added,), alpha))
    return clone
