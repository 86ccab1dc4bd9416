"""Text-to-image sampling with a concept on the reference backend: DDIM, classifier-free guidance and the
dual path of Eq. 5 (the paper's Sec. 4.3 at inference).

Each UNet call runs the conditional and the unconditional row as one batch. The conditional row's soft
context is the prompt with v* in its slot, its hard context the same prompt with v*'s nearest real token;
the unconditional row (the empty prompt) has no slot and keeps its own context on both paths, so on that
row only the LoRA offsets differ between paths, as in ComfyUI, where the patch sees both rows alike.
``alpha = 1`` is plain LoRA with the soft prompt (the ``no_dual_path`` ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from datencoder_core import Concept, DualPathState, LoRAFactors
from datencoder_core.reference import DiffusersReferenceBackend


@dataclass(frozen=True)
class ConceptPrediction:
    """What ``generate`` reads of a concept: v* (D,), unbatched LoRA factors and v*'s nearest token."""

    v_star: Tensor
    lora: LoRAFactors
    token_id: int


def sd15_ddim(steps: int) -> DDIMScheduler:
    """DDIM (eta 0) on SD1.x's schedule, with the settings of SD1.5's scheduler_config.json."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def generate(backend: DiffusersReferenceBackend, concept: Concept | ConceptPrediction, template: str, seeds: list[int], *,
             alpha: float, steps: int = 50, guidance: float = 7.5) -> Tensor:
    """Images (len(seeds), H, W, 3) in [0, 1], float32 on the CPU, of ``template`` (``{}`` = the concept).
    A concept is v*, its LoRA factors and its nearest token: a ``Concept``, or an encoder's prediction
    (``ConceptPrediction``, what pretraining's sample grids draw).

    Image i starts from the latent noise of ``torch.Generator().manual_seed(seeds[i])``, so the same seed
    gives the same start for every variant and the same image on every rerun.
    """
    n, device, dtype = len(seeds), backend.device, backend.unet.dtype
    prompt = backend.prompt_ids(template)
    soft = backend.encode_prompt(prompt, concept.token_id, concept.v_star.to(device))
    hard = backend.encode_prompt(prompt, concept.token_id)
    empty = backend.encode_prompt("", concept.token_id)
    context = torch.cat([soft.expand(n, -1, -1), empty.expand(n, -1, -1)])  # (2n, S, D): cond rows, then uncond
    state = DualPathState(concept.lora, alpha, torch.cat([hard.expand(n, -1, -1), empty.expand(n, -1, -1)]))

    side = backend.image_size // 2 ** (len(backend.vae.config.block_out_channels) - 1)
    channels = backend.unet.config.in_channels
    latents = torch.cat([torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device, dtype)
    scheduler = sd15_ddim(steps)
    for t in scheduler.timesteps:
        timesteps = torch.full((2 * n,), int(t), device=device)
        eps_cond, eps_uncond = backend.predict_noise(torch.cat([latents, latents]), timesteps, context,
                                                     state).chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    pixels = backend.vae.decode(latents / backend.vae.config.scaling_factor).sample
    return ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()
