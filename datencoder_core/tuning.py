"""Inference-time personalization (Sec. 4.4): one encoder forward, then a few regularised LoRA steps.

The encoder forward and every step's noise prediction are ``forward.py``'s, the path pretraining and its
validation run. From the encoder's prediction (v*_0, A_0, B_0) on the concept noised at
``TuningConfig.encoder_timestep``, AdamW optimises v*, A and B only, on the diffusion loss (Eq. 1) of the
concept image at a mini-batch of random timesteps, with the dual path of Eq. 5 on and an L2 term pulling
v* and dW toward the prediction:

    L = ||eps - eps_theta(z_t, t, C(v*), C_h; W + dW, a)||^2 + w_v ||v* - v*_0||^2 + w_W sum_l ||dW_l - dW_l,0||_F^2

Without an encoder (issue 27; ``personalize_from_word``), the same loop starts from ``word_start``: v*_0 the
mean embedding of a class word the user names, A_0 LoRA's usual init and B_0 = 0 (dW_0 = 0), with the
longer ``config.WORD_START_TUNING``. A loss that turns NaN or inf stops the loop with a ``DATEncoderError``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .backend import PersonalizationBackend
from .checkpoint import check_base_model
from .concept import NO_ENCODER, Concept
from .config import LoRAConfig, TuningConfig
from .encoder import DATEncoder
from .errors import DATEncoderError
from .forward import EncoderForward, add_noise, concept_noise_prediction, encoder_forward, nearest_token_ids
from .lora import LoRAFactors
from .losses import diffusion_loss
from .prompts import PromptIds
from .sites import architecture_fingerprint, site_target

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


def word_start(backend: PersonalizationBackend, word: str, lora_config: LoRAConfig,
               seed: int) -> tuple[Tensor, LoRAFactors]:
    """The encoder-free start: v*_0 (D,) float32, the mean of the token-embedding rows of the tokens ``word``
    tokenizes to (one token: its row), and factors per site of ``lora_config.targets`` with LoRA's standard
    init (Hu et al.; peft's default): A uniform in +-1/sqrt(D_in), drawn in site order from a generator
    seeded with ``seed``, and B = 0, so dW_0 = 0 and the gradient reaches B. ``personalize_from_word`` draws
    A from the generator its tuning then goes on with."""
    return _word_start(backend, word, lora_config, torch.Generator().manual_seed(seed))


def _word_start(backend: PersonalizationBackend, word: str, lora_config: LoRAConfig,
                generator: torch.Generator) -> tuple[Tensor, LoRAFactors]:
    ids = backend.word_token_ids(word)
    if not ids:
        raise DATEncoderError(f"the start word {word!r} has no tokens: name the concept's class word, e.g. 'cat'")
    v_start = backend.token_embeddings[ids].float().mean(0).to(backend.device)
    sites = [site for site in backend.sites if site_target(site.name) in lora_config.targets]
    if not sites:
        raise DATEncoderError(f"the UNet has no attention projection of the LoRA targets {list(lora_config.targets)}")
    down, up = {}, {}
    for site in sites:
        bound = 1 / math.sqrt(site.in_features)
        down[site.name] = ((torch.rand(lora_config.rank, site.in_features, generator=generator) * 2 - 1) * bound
                           ).to(backend.device)
        up[site.name] = torch.zeros(site.out_features, lora_config.rank, device=backend.device)
    return v_start, LoRAFactors(down, up, lora_config.scale)


def personalize_from_word(backend: PersonalizationBackend, word: str, lora_config: LoRAConfig, images: Tensor,
                          config: TuningConfig, progress: ProgressCallback | None = None,
                          interrupt: Callable[[], None] | None = None) -> Concept:
    """Personalize without an encoder: ``tune`` from ``word_start(backend, word, lora_config, config.seed)``
    on ``images`` (B, H, W, C) in [0, 1], the anchors pulling toward that start. The concept's encoder_id
    is ``concept.NO_ENCODER`` and its ``init_word`` is ``word``; ``progress`` and ``interrupt`` as in
    ``personalize``. Defaults for ``config``: ``config.WORD_START_TUNING``."""
    generator = torch.Generator().manual_seed(config.seed)
    v_start, lora = _word_start(backend, word, lora_config, generator)
    concept = tune(backend, backend.encode_latents(images), v_start, lora, NO_ENCODER, lora_config.targets, config,
                   generator, progress, interrupt)
    concept.init_word = word
    return concept


def tune(backend: PersonalizationBackend, latents: Tensor, v_anchor: Tensor, lora_anchor: LoRAFactors,
         encoder_id: str, lora_targets: tuple[str, ...], config: TuningConfig, generator: torch.Generator,
         progress: ProgressCallback | None = None, interrupt: Callable[[], None] | None = None) -> Concept:
    """The ``config.steps`` AdamW steps of Sec. 4.4 from a given start (v*_0 (D,), unbatched A_0/B_0 per
    site), which the L2 terms pull toward, on the concept ``latents`` (N, C, h, w). ``personalize`` starts
    from the encoder's prediction, ``personalize_from_word`` from a word (training.evaluate's ``scratch``).
    ``generator`` draws the rows, timesteps and noise; the anchors are not written. A NaN or inf loss (or
    v*, A, B after the last step) raises ``DATEncoderError`` at once: nothing non-finite is returned."""
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
        if not torch.isfinite(loss):
            raise DATEncoderError(
                f"tuning diverged: the loss of step {step + 1}/{config.steps} is {loss.item()} at lr {config.lr:g}; "
                f"no concept was made. Lower lr (e.g. to {config.lr / 10:g}), or the steps, and run again")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, config.steps, loss.item())

    if not (torch.isfinite(v_star).all() and all(torch.isfinite(t).all() for t in lora.parameters())):
        raise DATEncoderError(f"tuning diverged: after step {config.steps} v* or the LoRA holds NaN or inf at lr "
                              f"{config.lr:g}; no concept was made. Lower lr (e.g. to {config.lr / 10:g}) and run "
                              f"again")
    token_id = nearest_token_ids(backend, v_star[None])[0]
    return Concept(v_star.detach(), lora.detached_clone(), token_id, backend.decode_token(token_id), fingerprint,
                   encoder_id, config, lora_targets)
