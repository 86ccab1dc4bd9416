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

Other packs' attention patches: ``attn1_patch`` / ``attn2_patch`` (which edit the attention inputs
before it runs) work together with the dual path, as long as they keep the value equal to the
context and the context's shape. An ``attn2_replace`` patch (IPAdapter's way) replaces the cross-
attention call and would drop the dual path there, so it is refused, when the patch is applied and
when sampling.
"""

from __future__ import annotations

import comfy.conds
import comfy.utils
from comfy.patcher_extension import WrappersMP
from ..datencoder_core import (Concept, DATEncoderError, DualPathState, LoRAConfig, LoRAFactors,
                               architecture_fingerprint, discover_sites)
from ..datencoder_core.attention import dual_path_forward, sites_by_attention
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
                                  "attention, which the Dual-Path Model Patch cannot combine with; sample without "
                                  "that patch, or without the Dual-Path Model Patch")
        if self.is_cross and context.shape != state.hard_context.shape:
            raise DATEncoderError(f"another node's attn2_patch changed the cross-attention context to "
                                  f"{tuple(context.shape)} (the prompt is {tuple(state.hard_context.shape)}); the "
                                  f"Dual-Path Model Patch cannot combine with it: sample without one of the two")
        return dual_path_forward(self.module, x, context, state, self.sites, self.is_cross)


def _refuse_attn2_replace(transformer_options: dict) -> None:
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    if replaced:
        raise DATEncoderError(f"this MODEL carries attn2_replace patches from another node (e.g. IPAdapter) on "
                              f"{len(replaced)} cross-attention block(s); they replace the cross-attention the "
                              f"Dual-Path Model Patch runs in, so the concept would be silently dropped there. "
                              f"Apply only one of the two")


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


class DualPathWrapper:
    """``WrappersMP.APPLY_MODEL`` wrapper: gives every model call its ``DualPathState``, with the
    concept's LoRA factors on the call's device and the hard context batched like the prompt."""

    def __init__(self, lora: LoRAFactors, alpha: float):
        self.lora, self.alpha = lora, alpha
        self._on_device: LoRAFactors | None = None

    def _lora_on(self, device) -> LoRAFactors:
        if self._on_device is None or next(iter(self._on_device.down.values())).device != device:
            self._on_device = LoRAFactors({k: v.to(device) for k, v in self.lora.down.items()},
                                          {k: v.to(device) for k, v in self.lora.up.items()}, self.lora.scale)
        return self._on_device

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        hard = kwargs.pop(HARD_CONTEXT_KEY, None)
        if hard is None:
            raise DATEncoderError("the Dual-Path Model Patch got a model call without its hard prompt: sample "
                                  "with one of ComfyUI's sampler nodes (KSampler, SamplerCustom, ...)")
        _refuse_attn2_replace(transformer_options)
        state = DualPathState(self._lora_on(x.device), self.alpha, hard)
        options = {**transformer_options, STATE_KEY: state}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def patch_model(patcher, concept: Concept, alpha: float, lora_strength: float = 1.0):
    """A clone of ``patcher`` that samples with ``concept`` through the dual path (Eq. 5). One concept
    per model: a model that already carries one is refused, as is one with attn2_replace patches."""
    if patcher.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        raise DATEncoderError("this MODEL already went through a Dual-Path Model Patch; DATEncoder applies one "
                              "concept per model: patch the original MODEL instead")
    _refuse_attn2_replace(patcher.model_options.get("transformer_options", {}))
    sites, _ = comfy_sites(patcher)
    fingerprint = architecture_fingerprint(sites, patcher.model.model_config.unet_config["context_dim"])
    if concept.base_fingerprint != fingerprint:
        raise DATEncoderError(f"the concept (encoder {concept.encoder_id}) was made for another base model "
                              f"(fingerprint {concept.base_fingerprint}, this MODEL's is {fingerprint}); "
                              f"use an SD1.x checkpoint")
    clone, _ = with_dual_path_attention(patcher)
    lora = LoRAFactors(concept.lora.down, concept.lora.up, concept.lora.scale * lora_strength)
    clone.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY, add_hard_contexts)
    clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, DualPathWrapper(lora, alpha))
    return clone
