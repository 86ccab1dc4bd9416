"""Inference-time personalization (Sec. 4.4): one encoder forward, then a few regularised LoRA steps.

The encoder forward and every step's noise prediction are ``forward.py``'s, the path pretraining and its
validation run. From the encoder's prediction (v*_0, A_0, B_0) on the concept noised at
``TuningConfig.encoder_timestep``, AdamW optimises v*, A and B only, on the diffusion loss (Eq. 1) of the
concept image at a mini-batch of random timesteps, with the dual path of Eq. 5 on and an L2 term pulling
v* and dW toward the prediction:

    L = ||eps - eps_theta(z_t, t, C(v*), C_h; W + dW, a)||^2 + w_v ||v* - v*_0||^2 + w_W sum_l ||dW_l - dW_l,0||_F^2
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .backend import PersonalizationBackend
from .checkpoint import check_base_model
from .concept import Concept
from .config import TuningConfig
from .encoder import DATEncoder
from .forward import EncoderForward, add_noise, concept_noise_prediction, encoder_forward, nearest_token_ids
from .lora import LoRAFactors
from .losses import diffusion_loss
from .prompts import PromptIds
from .sites import architecture_fingerprint

ProgressCallback = Callable[[int, int, float], None]  # (steps done, total steps, last loss)


@torch.no_grad()
def predict(backend: PersonalizationBackend, encoder: DATEncoder, latents: Tensor, images: Tensor,
            timestep: int, generator: torch.Generator) -> EncoderForward:
    """Personalization's one encoder forward (``forward.encoder_forward``) over N photos of one concept,
    noised at ``timestep`` with noise drawn from ``generator``: their trunk features are averaged, so the
    prediction is a single v* (1, D) and one set of factors (1, ...), with its nearest token."""
    timesteps = torch.full((latents.shape[0],), timestep, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator)
    return encoder_forward(backend, encoder, images, latents, noise, timesteps, pool=True)


def personalize(backend: PersonalizationBackend, encoder: DATEncoder, encoder_id: str, images: Tensor,
                config: TuningConfig = TuningConfig(), progress: ProgressCallback | None = None,
                interrupt: Callable[[], None] | None = None) -> Concept:
    """Personalize from ``images`` (B, H, W, C) in [0, 1]: one or more photos of the same concept.

    ``interrupt`` is called before every step and may raise to cancel; ``progress`` after every step.
    Only v*, A and B get gradients; the backend's weights are never written. Same inputs and
    ``config.seed`` give the same concept.
    """
    check_base_model(f"the encoder {encoder_id}", architecture_fingerprint(encoder.sites, encoder.config.token_dim),
                     "this UNet", architecture_fingerprint(backend.sites, backend.token_embeddings.shape[1]))
    generator = torch.Generator().manual_seed(config.seed)
    latents = backend.encode_latents(images)
    prediction = predict(backend, encoder, latents, images, config.encoder_timestep, generator).prediction
    return tune(backend, latents, prediction.v_star[0], prediction.lora.row(0), encoder_id,
                encoder.lora_config.targets, config, generator, progress, interrupt)


def tune(backend: PersonalizationBackend, latents: Tensor, v_anchor: Tensor, lora_anchor: LoRAFactors,
         encoder_id: str, lora_targets: tuple[str, ...], config: TuningConfig, generator: torch.Generator,
         progress: ProgressCallback | None = None, interrupt: Callable[[], None] | None = None) -> Concept:
    """The ``config.steps`` AdamW steps of Sec. 4.4 from a given start (v*_0 (D,), unbatched A_0/B_0 per
    site), which the L2 terms pull toward, on the concept ``latents`` (N, C, h, w). ``personalize`` starts
    from the encoder's prediction; an encoder-free baseline (training.evaluate's ``scratch``) from its own.
    ``generator`` draws the rows, timesteps and noise; the anchors are not written."""
    fingerprint = architecture_fingerprint(backend.sites, backend.token_embeddings.shape[1])
    v_star = v_anchor.clone().requires_grad_(True)
    lora = lora_anchor.detached_clone()
    for tensor in lora.parameters():
        tensor.requires_grad_(True)
    optimizer = torch.optim.AdamW([v_star, *lora.parameters()], lr=config.lr, weight_decay=0.0)
    prompts = [backend.prompt_ids(config.prompt)]  # tokenized once; each step only fills the slot
    hard_contexts: dict[tuple[PromptIds, int], Tensor] = {}
    batch, device = config.timesteps_per_step, latents.device
    for step in range(config.steps):
        if interrupt is not None:
            interrupt()
        rows = torch.randint(latents.shape[0], (batch,), generator=generator)
        timesteps = torch.randint(len(backend.alphas_cumprod), (batch,), generator=generator).to(device)
        noise = torch.randn((batch, *latents.shape[1:]), generator=generator).to(latents)
        noisy = add_noise(latents[rows.to(device)], noise, timesteps, backend.alphas_cumprod)
        noise_pred, _ = concept_noise_prediction(backend, v_star, lora, prompts, noisy, timesteps, config.alpha_blend,
                                                 hard_contexts)
        loss = (diffusion_loss(noise_pred, noise)
                + config.embedding_anchor_weight * (v_star - v_anchor).pow(2).sum()
                + config.lora_anchor_weight * lora.squared_norms(lora_anchor))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, config.steps, loss.item())

    token_id = nearest_token_ids(backend, v_star[None])[0]
    return Concept(v_star.detach(), lora.detached_clone(), token_id, backend.decode_token(token_id), fingerprint,
                   encoder_id, config, lora_targets)
