"""The dual path (Eq. 5) on a ComfyUI ``ModelPatcher`` clone, for sampling with a concept.

Host hooks, all on a clone so the input MODEL is never changed:
* object patch ``diffusion_model.<attention>.forward`` per SD1.x attention module -> ``DualPathAttentionPatch``
  (``attn*_replace`` patches only see projections made with the base weights, so they cannot carry
  the LoRA; see DESIGN.md);
* object patch ``extra_conds`` -> ``ConceptConds``: the hard context that "Apply Concept Token" puts in
  the conditioning becomes a batched ``CONDCrossAttn``, so ComfyUI batches it like the prompt;
* ``model_function_wrapper`` -> ``DualPathWrapper``: per model call, takes that hard context out of the
  model inputs and puts a ``DualPathState`` into ``transformer_options``. Chunks marked unconditional
  in ``cond_or_uncond`` keep their own context on the hard path (the negative prompt has no concept).
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.utils
import torch
from torch import Tensor

from ..datencoder_core import (Concept, DATEncoderError, DualPathState, LoRAConfig, LoRAFactors,
                               architecture_fingerprint, discover_sites)
from ..datencoder_core.attention import dual_path_forward, sites_by_attention
from ..datencoder_core.sites import LoRASite

HARD_CONTEXT_KEY = "datencoder_hard_context"  # conditioning key set by "Apply Concept Token"
STATE_KEY = "datencoder"  # transformer_options key read by DualPathAttentionPatch


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


class DualPathAttentionPatch:
    """Replaces one ``CrossAttention.forward`` (host hook: ``ModelPatcher.add_object_patch``). Runs Eq. 5
    when ``transformer_options`` carries a ``DualPathState``, plain attention otherwise."""

    def __init__(self, module, sites: dict[str, str]):
        self.module, self.sites = module, sites

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):
        state = transformer_options.get(STATE_KEY)
        if state is None:  # not a concept call: ComfyUI's own forward, untouched
            return type(self.module).forward(self.module, x, context=context, value=value, mask=mask,
                                             transformer_options=transformer_options)
        if value is not None or mask is not None:
            raise DATEncoderError("another patch passes a separate value or mask to SD1.x attention, which the "
                                  "Dual-Path Model Patch cannot combine with; apply it without that patch")
        return dual_path_forward(self.module, x, context, state, self.sites)


class ConceptConds:
    """Wraps ``BaseModel.extra_conds`` to batch the conditioning's hard context like the prompt."""

    def __init__(self, extra_conds):
        self.extra_conds = extra_conds

    def __call__(self, **kwargs):
        out = self.extra_conds(**kwargs)
        hard = kwargs.get(HARD_CONTEXT_KEY)
        if hard is not None:
            out[HARD_CONTEXT_KEY] = comfy.conds.CONDCrossAttn(hard)
        return out


class DualPathWrapper:
    """``model_function_wrapper`` that gives every model call its ``DualPathState`` (chains a previous one)."""

    def __init__(self, lora: LoRAFactors, alpha: float, previous=None):
        self.lora, self.alpha, self.previous = lora, alpha, previous
        self._moved: LoRAFactors | None = None

    def _lora_like(self, x: Tensor) -> LoRAFactors:
        if self._moved is None or next(iter(self._moved.down.values())).device != x.device:
            self._moved = LoRAFactors({k: v.to(x.device) for k, v in self.lora.down.items()},
                                      {k: v.to(x.device) for k, v in self.lora.up.items()}, self.lora.scale)
        return self._moved

    def __call__(self, apply_model, args):
        c = dict(args["c"])
        context = c["c_crossattn"]
        hard = c.pop(HARD_CONTEXT_KEY, None)
        if hard is None:
            hard = context
        else:
            context, hard = _matched_contexts(context, hard, args["cond_or_uncond"])
            c["c_crossattn"] = context
        options = dict(c.get("transformer_options", {}))
        options[STATE_KEY] = DualPathState(self._lora_like(args["input"]), self.alpha, hard)
        c["transformer_options"] = options
        if self.previous is not None:
            return self.previous(apply_model, {**args, "c": c})
        return apply_model(args["input"], args["timestep"], **c)


def _matched_contexts(context: Tensor, hard: Tensor, cond_or_uncond: list[int]) -> tuple[Tensor, Tensor]:
    """(context, hard context) per batch row, token lengths made equal the way ComfyUI does (repeat to
    the LCM): the conditioning's hard prompt for cond chunks, the row's own context for uncond chunks."""
    length = math.lcm(context.shape[1], hard.shape[1])
    context = context.repeat(1, length // context.shape[1], 1)
    hard = hard.repeat(1, length // hard.shape[1], 1).to(context)
    rows = torch.tensor(cond_or_uncond, device=context.device).repeat_interleave(context.shape[0] // len(cond_or_uncond))
    return context, torch.where((rows == 1)[:, None, None], context, hard)


def patch_model(patcher, concept: Concept, alpha: float, lora_strength: float = 1.0):
    """A clone of ``patcher`` that samples with ``concept`` through the dual path (Eq. 5). One concept
    per model: a model that already carries one is refused."""
    if isinstance(patcher.model_options.get("model_function_wrapper"), DualPathWrapper):
        raise DATEncoderError("this MODEL already went through a Dual-Path Model Patch; DATEncoder applies one "
                              "concept per model: patch the original MODEL instead")
    sites, comfy_path = comfy_sites(patcher)
    fingerprint = architecture_fingerprint(sites, patcher.model.model_config.unet_config["context_dim"])
    if concept.base_fingerprint != fingerprint:
        raise DATEncoderError(f"the concept (encoder {concept.encoder_id}) was made for another base model "
                              f"(fingerprint {concept.base_fingerprint}, this MODEL's is {fingerprint}); "
                              f"use an SD1.x checkpoint")
    clone = patcher.clone()
    diffusion_model = patcher.model.diffusion_model
    for projections in sites_by_attention(sites).values():
        path = comfy_path[next(iter(projections.values()))].rsplit(".", 1)[0]
        clone.add_object_patch(f"diffusion_model.{path}.forward",
                               DualPathAttentionPatch(comfy.utils.get_attr(diffusion_model, path), projections))
    clone.add_object_patch("extra_conds", ConceptConds(patcher.get_model_object("extra_conds")))
    lora = LoRAFactors(concept.lora.down, concept.lora.up, concept.lora.scale * lora_strength)
    clone.set_model_unet_function_wrapper(
        DualPathWrapper(lora, alpha, patcher.model_options.get("model_function_wrapper")))
    return clone
